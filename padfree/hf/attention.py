"""The transformers attention adapter: `padfree` as an `AttentionInterface` implementation.

`patch_attention` registers `attention_forward` under the name "padfree" in transformers'
`AttentionInterface`, and transformers' flash-attention mask builder under the same name in
`AttentionMaskInterface` (without it the mask builder returns None and a padded batch could not be
told from a plain one). It then switches ONE model instance to "padfree" with
`model.set_attn_implementation`, after keeping every config's previous implementation so undo
restores exactly that.

`attention_forward` gets the tensors as transformers' attention modules pass them, query
(B, Hq, S, D) and key/value (B, Hkv, S_kv, D), turns them into packed varlen form, runs
`padfree.varlen_attention` and returns (out (B, S, Hq, D), None). Where the sequence boundaries come
from, first match wins:

  1. `cu_seq_lens_q/k` and `max_length_q/k` keyword arguments (what `PaddingFreeCollator` and
     transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` put in the batch,
     and the model forwards to every attention layer);
  2. a 2D padding mask (B, S_kv): each row's unmasked tokens are one sequence (unpad, attend,
     pad the output back with zeros). The mask builder only passes one when some token is masked;
  3. `position_ids` when queries and keys have the same length (training, no cache): a sequence
     starts at every row start and wherever a position does not follow the previous one, so a
     packed row (B == 1, positions reset per sequence) gives one sequence per packed example and a
     plain batch gives one per row. Nothing here copies to the host;
  4. otherwise every row is one sequence (e.g. decoding with a cache; causal attention is aligned
     bottom-right, so the new queries see the whole cache).

Per-layer options come from the call and the module: `sliding_window` (the argument when the
layer passes one, None included: Exaone4 and Kolibri1 pass None for their full-attention layers
while the module still carries a window; `module.sliding_window` only when the argument is not
passed at all), `softcap`, `scaling`, `dropout` (only while `module.training`), causal from the
`is_causal` keyword else `module.is_causal`, attention sinks `s_aux` (GPT-OSS) and a value head
dim different from the query's (multi-head latent attention) forwarded as they are. Grouped-query
key/value heads go to the kernel as they are (no repeat). Transformers' sliding window W lets
query i see keys i-W < j <= i, which is flash-attn's window_size (W - 1, 0).

Sequence boundaries are worked out once per batch: every layer of a forward gets the same
`position_ids` / `attention_mask` tensor, so what `_pack` derives from it (offsets, the kept-token
rows and their host-side maximum) is cached on that tensor object, keyed by its version counter
so an in-place change is noticed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from padfree.ops import seqlens

NAME = "padfree"
PART = "attention"


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int or a one-element tensor, got shape {tuple(value.shape)}")
        return int(value.item())
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


# Default of `attention_forward`'s sliding_window: tells "not passed" from "passed None".
_NOT_PASSED = object()


def _window(module: torch.nn.Module, sliding_window, causal: bool) -> tuple[int, int]:
    window = getattr(module, "sliding_window", None) if sliding_window is _NOT_PASSED else sliding_window
    if window is None:
        return (-1, 0) if causal else (-1, -1)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {window!r}")
    return (window - 1, 0) if causal else (window - 1, window - 1)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _uniform_offsets(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


class _Packed:
    """q/k/v in varlen form (tokens, heads, dim) and how to put the output back as (B, S, Hq, D)."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check, query_rows=None):
        self.q, self.k, self.v = q, k, v
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.check = check
        self.query_rows = query_rows  # token index in (B * S) of each packed query; None: all, in order

    def unpack(self, out: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        if self.query_rows is not None:
            full = out.new_zeros(batch * length, *out.shape[1:])
            out = full.index_put((self.query_rows,), out)
        return out.reshape(batch, length, *out.shape[1:])


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B * S, H, D)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _check_first_use(*tensors: torch.Tensor) -> bool | None:
    """`check` for varlen_attention: None (value checks as configured) the first time these
    boundary tensors are seen, False afterwards. Every layer of a forward gets the same
    `cu_seq_lens_*` tensors, so their values are copied to the host once per batch, not per layer."""
    if torch.compiler.is_compiling():
        return None
    if all(getattr(t, "_padfree_checked", False) for t in tensors):
        return False
    for t in tensors:
        t._padfree_checked = True
    return None


_CACHE_ATTR = "_padfree_per_batch"


def _per_batch(source: torch.Tensor, key: tuple, compute: Callable[[], tuple]) -> tuple:
    """`compute()`, once per batch: cached on the `source` tensor object (the `position_ids` or
    mask every layer receives), invalidated when its version counter says it changed in place."""
    if torch.compiler.is_compiling():
        return compute()
    version, cache = getattr(source, _CACHE_ATTR, (None, None))
    if version != source._version:
        cache = {}
        setattr(source, _CACHE_ATTR, (source._version, cache))
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _mask_boundaries(attention_mask: torch.Tensor, q_len: int) -> tuple:
    """A 2D padding mask -> (query rows, key rows, cu_seqlens_q, cu_seqlens_k, max_q, max_k); the
    two `int(max)` are the host syncs this path cannot avoid."""
    keep_k = attention_mask.to(torch.bool)
    keep_q = keep_k[:, -q_len:]
    lengths_q, lengths_k = keep_q.sum(1), keep_k.sum(1)
    return (keep_q.reshape(-1).nonzero().squeeze(1), keep_k.reshape(-1).nonzero().squeeze(1),
            _offsets(lengths_q), _offsets(lengths_k), int(lengths_q.max()), int(lengths_k.max()))


def _position_boundaries(position_ids: torch.Tensor, batch: int, q_len: int) -> torch.Tensor:
    position_ids = position_ids.reshape(-1, q_len).expand(batch, q_len).to(torch.int64)
    return seqlens.cu_seqlens_from_position_ids(position_ids)[0]


def _pack(query, key, value, attention_mask, kwargs) -> _Packed:
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    device = query.device
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_seqlens_q = kwargs["cu_seq_lens_q"]
        cu_seqlens_k = kwargs.get("cu_seq_lens_k")
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = batch * q_len if max_q is None else _as_int(max_q, "max_length_q")
        max_k = max_q if max_k is None else _as_int(max_k, "max_length_k")
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        return _Packed(_tokens(query), _tokens(key), _tokens(value), cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                       check=_check_first_use(cu_seqlens_q, cu_seqlens_k))
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, kv_len):
            raise ValueError(f"padfree attention takes a 2D padding mask (batch, kv_len) = ({batch}, {kv_len}); "
                             f"got attention_mask of shape {tuple(attention_mask.shape)} (a 4D or custom mask "
                             "cannot be expressed as packed sequences: use attn_implementation='eager' or 'sdpa')")
        rows_q, rows_k, cu_seqlens_q, cu_seqlens_k, max_q, max_k = _per_batch(
            attention_mask, ("mask", q_len), lambda: _mask_boundaries(attention_mask, q_len))
        return _Packed(_tokens(query)[rows_q], _tokens(key)[rows_k], _tokens(value)[rows_k],
                       cu_seqlens_q, cu_seqlens_k, max_q, max_k, check=False, query_rows=rows_q)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == kv_len and position_ids.shape[-1] == q_len:
        cu_seqlens = _per_batch(position_ids, ("positions", batch, q_len),
                                lambda: _position_boundaries(position_ids, batch, q_len))
        # The true longest length stays on the device; any upper bound is a valid max_seqlen.
        return _Packed(_tokens(query), _tokens(key), _tokens(value), cu_seqlens, cu_seqlens, q_len, q_len,
                       check=False)
    return _Packed(_tokens(query), _tokens(key), _tokens(value), _uniform_offsets(batch, q_len, device),
                   _uniform_offsets(batch, kv_len, device), q_len, kv_len, check=False)


def _refuse_unservable(module: torch.nn.Module) -> None:
    """A model switched to "padfree" without `patch` (from_pretrained(attn_implementation="padfree"))
    never went through `models.refusal`: check what its config tells, once per attention module."""
    from padfree.hf import models

    if getattr(module, "_padfree_served", False):
        return
    reason = models.config_refusal(getattr(module, "config", None))
    if reason is not None:
        raise ValueError(f"padfree attention cannot serve this model exactly: {reason}")
    module._padfree_served = True


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window=_NOT_PASSED, softcap: float | None = None, s_aux: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function backed by `padfree.varlen_attention` (see the module doc).

    query (B, Hq, S, D), key (B, Hkv, S_kv, D), value (B, Hkv, S_kv, Dv), s_aux (Hq,) attention
    sinks or None -> (attn_output (B, S, Hq, Dv), None).
    """
    from padfree.ops.attention import varlen_attention

    _refuse_unservable(module)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, _, q_len, _ = query.shape
    packed = _pack(query, key, value, attention_mask, kwargs)
    sinks = {} if s_aux is None else {"s_aux": s_aux}
    out = varlen_attention(packed.q, packed.k, packed.v, packed.cu_seqlens_q, packed.cu_seqlens_k,
                           packed.max_seqlen_q, packed.max_seqlen_k,
                           dropout_p=float(dropout) if module.training else 0.0, softmax_scale=scaling,
                           causal=causal, window_size=_window(module, sliding_window, causal),
                           softcap=float(softcap) if softcap else 0.0, check=packed.check, **sinks)
    return packed.unpack(out, batch, q_len), None


def register() -> None:
    """Make "padfree" a valid `attn_implementation` for transformers: `from_pretrained(...,
    attn_implementation="padfree")`, `model.set_attn_implementation("padfree")`, TRL's
    `model_init_kwargs` and trainer CLIs' `--attn_implementation padfree`.

    Registers `attention_forward` in transformers' `AttentionInterface` (the names transformers
    accepts are that registry's keys) and transformers' flash-attention mask builder in
    `AttentionMaskInterface` (without it the model would build no mask for "padfree" and a padded
    batch could not be told from a plain one). Idempotent; nothing else changes, no model is
    switched. A model switched this way is not checked the way `padfree.patch` checks it: call
    `padfree.patch(model)` after loading to get the report and the refusals.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def find_transformers_model(model: torch.nn.Module):
    """The outermost transformers `PreTrainedModel` in `model` (itself, or inside a PEFT wrapper)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _configs(model) -> list:
    """Every config whose `_attn_implementation` transformers may change on `model`, once each."""
    found: dict[int, object] = {}
    pending = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None)
    return list(found.values())


def _describe(module: torch.nn.Module, config) -> str:
    heads = getattr(config, "num_attention_heads", "?")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    parts = ["causal" if getattr(module, "is_causal", True) else "bidirectional", f"heads {heads}/{kv_heads}"]
    window = getattr(module, "sliding_window", None)
    if window:
        parts.append(f"sliding window {window}")
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap:
        parts.append(f"softcap {softcap}")
    return "padfree varlen attention (" + ", ".join(parts) + ")"


def patch_attention(model: torch.nn.Module, report, undo: list[Callable[[], None]]) -> None:
    """Switch `model`'s attention to padfree (the `patch` protocol: see padfree/hf/patch.py).

    Records one entry per attention module, or one entry for the whole model saying why it was not
    patched (not a transformers model, or `models.refusal`'s reason). Nothing is changed then.
    """
    from padfree.hf import models

    target = find_transformers_model(model)
    if target is None:
        report.add(PART, "", False, f"{type(model).__name__} holds no transformers PreTrainedModel")
        return
    reason = models.refusal(target)
    if reason is not None:
        report.add(PART, "", False, reason)
        return
    attention_modules = models.attention_modules(target)
    register()
    saved = [(config, config._attn_implementation_internal) for config in _configs(target)]

    def restore() -> None:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation

    target.set_attn_implementation(NAME)
    missed = [name for name, m in attention_modules
              if getattr(getattr(m, "config", None), "_attn_implementation", NAME) != NAME]
    if missed:
        restore()
        report.add(PART, "", False, f"transformers did not switch {', '.join(missed)} to '{NAME}' "
                                    f"({type(target).__name__} cannot change its attention implementation); "
                                    "nothing patched")
        return
    undo.append(restore)
    prefix = _prefix(model, target)
    for name, module in attention_modules:
        report.add(PART, prefix + name, True, _describe(module, getattr(module, "config", target.config)))


def _prefix(model: torch.nn.Module, target: torch.nn.Module) -> str:
    if model is target:
        return ""
    name = next(name for name, m in model.named_modules() if m is target)
    return name + "."
