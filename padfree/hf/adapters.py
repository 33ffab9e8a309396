"""Several PEFT LoRA adapters on one frozen base, run in one padding-free pass.

`multi_adapter(model, adapters)`: every packed sequence names its adapter. The model's forward
takes `adapter_ids` (one adapter index per packed sequence, in the order of `adapters`; what
`PaddingFreeCollator(adapter_key=...)` builds) and every LoRA Linear runs
`padfree.lora_per_sequence_linear`, so one optimizer step trains each adapter from its own
sequences only.

`mixture_of_adapters(model, adapters, top_k, router, trainable)`: a mixture of LoRA experts. Every
LoRA Linear gets a router (a `torch.nn.Linear(in_features, N)` beside the adapters) that picks the
top-k adapters of each token (or of each packed sequence, from the mean of its tokens) with
`padfree.moe_route`, and runs `padfree.lora_mixture_linear`; the q/k/v of one attention and the
gate/up of one MLP (padfree/hf/lora.py's SHARED_GROUPS, when all are adapted, with one dtype and
dropout p) run as one `padfree.lora_mixture_linear_shared` call: the first member called routes
and computes every member's output in one pass over x and hands the others theirs when they are
called with that same x (as `padfree.patch(lora=True)` groups single adapters).
`load_mixture_of_adapters` loads what the patched model's `save_pretrained` wrote.

Both patch one model instance (PEFT's own modules keep their parameters; only the layers' `forward`
changes) and `unpatch_adapters(model)` restores it. In every forward the adapters are stacked from
their own PEFT parameters (`torch.stack`), so each adapter's gradient lands in its own Parameters
and PEFT's `save_pretrained` saves them as usual. Each adapter keeps its own LoRA scale
(alpha / r): when the adapters of a layer differ in it, each B is multiplied by its scale before
stacking (the op then runs with scale 1; autograd carries the scale into B's gradient). Adapters
of different ranks are zero-padded to the largest: a zero row of A and a zero column of B add
nothing, and the padding's gradient is dropped by the pad's backward. An adapter that does not
target a layer counts there as zeros.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from padfree import _checks
from padfree.hf.lora import SharedGroup, _dropout_p, find_groups, group_forward
from padfree.hf.patch import run_undo
from padfree.ops import seqlens
from padfree.ops.lora_mixture import lora_mixture_linear, lora_mixture_linear_shared, lora_per_sequence_linear
from padfree.ops.moe import moe_route

_STATE_ATTR = "_padfree_adapters_undo"
ROUTER_ATTR = "padfree_router"
MIXTURE_CONFIG = "padfree_mixture.json"
ROUTER_WEIGHTS = "padfree_router.safetensors"


def _peft_layer_classes():
    try:
        from peft.tuners.lora import layer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError as error:
        raise ImportError("padfree.hf.multi_adapter and mixture_of_adapters need peft (pip install peft)") from error
    return layer.Linear, layer.LoraLayer, AuxiliaryTrainingWrapper


def _loaded_adapters(model) -> dict:
    config = getattr(model, "peft_config", None)
    return config if isinstance(config, dict) else {}


def _load_adapter(model, path: str, name: str, trainable: bool):
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name, is_trainable=trainable)
        return model
    _, layer_class, _ = _peft_layer_classes()
    if any(isinstance(m, layer_class) for m in model.modules()):
        raise ValueError(f"cannot load the adapter at {path!r}: the model holds LoRA layers but is not a "
                         "peft.PeftModel; pass the PeftModel (or load the adapter yourself and pass its name)")
    return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=trainable)


def _resolve_adapters(model, adapters, trainable: bool = True) -> tuple[torch.nn.Module, list[str]]:
    """(the PEFT model, adapter names in order): names are taken as they are, paths are loaded (a
    plain transformers model is wrapped by `PeftModel.from_pretrained` for the first one)."""
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters must be a list of adapter names or paths, got {type(adapters).__name__}")
    if not adapters:
        raise ValueError("adapters is empty: name at least one LoRA adapter (a loaded name or a saved adapter's path)")
    names: list[str] = []
    for i, entry in enumerate(adapters):
        if not isinstance(entry, (str, os.PathLike)):
            raise TypeError(f"adapters[{i}] must be an adapter name or a path, got {type(entry).__name__}")
        loaded = _loaded_adapters(model)
        if isinstance(entry, str) and entry in loaded:
            name = entry
        else:
            path = os.fspath(entry)
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise ValueError(f"adapters[{i}] = {entry!r} is neither an adapter loaded in the model (loaded: "
                                 f"{sorted(loaded)}) nor a directory holding a saved PEFT adapter "
                                 "(adapter_config.json)")
            name = os.path.basename(os.path.normpath(path))
            if name in loaded:
                raise ValueError(f"adapters[{i}] = {entry!r} would load as adapter {name!r}, a name already loaded; "
                                 "load it under another name with model.load_adapter(path, adapter_name=...) "
                                 "and pass that name")
            model = _load_adapter(model, path, name, trainable)
        if name in names:
            raise ValueError(f"adapters names {name!r} twice (adapters[{names.index(name)}] and adapters[{i}])")
        names.append(name)
    return model, names


def _unsupported_reason(module, names: list[str], linear_class) -> str | None:
    """Why a LoRA layer holding some of `names` cannot run the mixture op, or None."""
    if not isinstance(module, linear_class):
        return f"{type(module).__name__} is not a LoRA Linear layer (only Linear layers are supported)"
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return f"base layer is {type(base).__name__}, not torch.nn.Linear (quantized or custom)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (transposed base weight)"
    if module.merged:
        return f"adapters {module.merged_adapters} are merged into the base weight (unmerge them first)"
    held = [n for n in names if n in module.lora_A]
    dropouts = set()
    for name in held:
        if name in module.lora_variant or module.use_dora.get(name, False):
            return f"adapter {name!r} is a LoRA variant (DoRA or other), not plain LoRA"
        if module.lora_B[name].bias is not None:
            return f"adapter {name!r} has a LoRA bias (lora_bias=True)"
        dropout = module.lora_dropout[name]
        if type(dropout) not in (torch.nn.Dropout, torch.nn.Identity):
            return f"adapter {name!r} has dropout module {type(dropout).__name__}, not nn.Dropout / nn.Identity"
        dropouts.add(float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0)
        dtypes = {module.lora_A[name].weight.dtype, module.lora_B[name].weight.dtype, base.weight.dtype}
        if len(dtypes) != 1:
            return f"adapter {name!r} and the base weight differ in dtype ({sorted(map(str, dtypes))})"
    if len(dropouts) > 1:
        return (f"the adapters have different LoRA dropout p {sorted(dropouts)} here; the op draws one mask "
                "for all of them")
    return None


def _adapted_layers(model, names: list[str]) -> dict[str, torch.nn.Module]:
    """Qualified name -> PEFT LoRA Linear holding at least one of `names`; raises ValueError listing
    every layer or wrapper of those adapters that the op cannot run."""
    linear_class, layer_class, wrapper_class = _peft_layer_classes()
    layers, problems = {}, []
    for qualified, module in model.named_modules():
        if isinstance(module, layer_class):
            if not set(names) & set(module._all_available_adapter_names()):
                continue
            reason = _unsupported_reason(module, names, linear_class)
            if reason is None:
                layers[qualified] = module
            else:
                problems.append(f"{qualified}: {reason}")
        elif isinstance(module, wrapper_class):
            per_adapter = sorted(set(names) & set(module._get_available_adapters()))
            if per_adapter:
                problems.append(f"{qualified}: {type(module).__name__} holds a whole copy of the module for "
                                f"adapters {per_adapter} (modules_to_save / trainable tokens), which cannot be "
                                "chosen per token or per sequence")
    if problems:
        raise ValueError("unsupported layers for the adapters " + ", ".join(map(repr, names)) + ":\n  "
                         + "\n  ".join(problems))
    if not layers:
        raise ValueError(f"the model has no LoRA Linear layer holding the adapters {names}")
    return layers


def stack_adapters(module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_a (N, r, in), lora_b (N, out, r), scaling) of one PEFT LoRA Linear, stacked from the
    adapters' own Parameters in the order of `names` (see the module docstring for scales, ranks
    and adapters missing from the layer)."""
    base = module.get_base_layer()
    held = [n for n in names if n in module.lora_A]
    rank = max(module.lora_A[n].weight.shape[0] for n in held)
    scalings = {float(module.scaling[n]) for n in held}
    fold = len(scalings) > 1
    lora_a, lora_b = [], []
    for name in names:
        if name not in module.lora_A:
            lora_a.append(base.weight.new_zeros(rank, base.in_features))
            lora_b.append(base.weight.new_zeros(base.out_features, rank))
            continue
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        if fold:
            b = b * float(module.scaling[name])
        pad = rank - a.shape[0]
        lora_a.append(torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a)
        lora_b.append(torch.nn.functional.pad(b, (0, pad)) if pad else b)
    return torch.stack(lora_a), torch.stack(lora_b), 1.0 if fold else scalings.pop()


def _held_adapter(module, names: list[str]) -> str:
    return next(n for n in names if n in module.lora_A)


def _refuse_state(module, args, kwargs) -> None:
    if args or kwargs:
        raise TypeError(f"a LoRA layer patched by padfree's adapters takes only its input, got extra arguments "
                        f"{len(args)} positional and {sorted(kwargs)} (adapter_names: use adapter_ids on the model)")
    if module.merged:
        raise ValueError("adapters were merged into the base weight after padfree patched the layer; "
                         "unmerge them (model.unmerge_adapter()) or unpatch first")


class _Batch:
    """`cu_seqlens` (and `adapter_ids`) of the current forward, shared by every patched layer. Kept
    after the forward so that gradient checkpointing's recomputation sees the same batch."""

    def __init__(self):
        self.adapter_ids: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.tokens = 0


def _input_shape(args, kwargs) -> tuple[int, int, torch.device]:
    inputs = kwargs.get("input_ids")
    if inputs is None and args and isinstance(args[0], torch.Tensor):
        inputs = args[0]
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("padfree's adapters need the batch's input_ids (batch, seq_len) or inputs_embeds")
    return inputs.shape[0], inputs.shape[1], inputs.device


def _as_adapter_ids(adapter_ids, num_adapters: int, device: torch.device) -> torch.Tensor:
    if isinstance(adapter_ids, (list, tuple)):
        adapter_ids = torch.tensor(adapter_ids, dtype=torch.int64)
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64) \
            or adapter_ids.dim() != 1:
        described = (f"{adapter_ids.dtype} tensor of shape {tuple(adapter_ids.shape)}"
                     if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__)
        raise TypeError(f"adapter_ids must be a 1-D int32/int64 tensor (one adapter index per packed sequence), "
                        f"got {described}")
    if adapter_ids.numel() == 0:
        raise ValueError("adapter_ids is empty: give one adapter index per packed sequence")
    adapter_ids = adapter_ids.to(device)
    if _checks.value_checks_enabled(None):
        low, high = int(adapter_ids.min()), int(adapter_ids.max())
        if low < 0 or high >= num_adapters:
            raise ValueError(f"adapter_ids holds adapter {low if low < 0 else high}, outside 0..{num_adapters - 1} "
                             f"(the {num_adapters} adapters given to multi_adapter)")
    return adapter_ids


def _all_offsets(kwargs, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """(cu_seqlens int32, where from) of the batch's sequences, without a host sync: `cu_seq_lens_q`,
    else where `position_ids` restart (then (tokens + 1,) offsets, the sequences past the last one
    empty), else one sequence per row."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int32), "cu_seq_lens_q"
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        position_ids = position_ids.reshape(-1, length).expand(batch, length).long()
        return seqlens.cu_seqlens_from_position_ids(position_ids)[0].to(device), "position_ids"
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length, "rows"


def _sequence_offsets(kwargs, batch: int, length: int, device: torch.device, count: int) -> torch.Tensor:
    """cu_seqlens (count + 1,) int32 of the batch's sequences (see `_all_offsets`). Raises when the
    batch has not `count` sequences (one host sync for `position_ids`, unless value checks are off)."""
    tokens = batch * length
    cu_seqlens, source = _all_offsets(kwargs, batch, length, device)
    if source == "position_ids":
        if count > tokens:
            raise ValueError(f"adapter_ids has {count} entries, more than the batch's {tokens} tokens")
        if _checks.value_checks_enabled(None):
            found = int((cu_seqlens < tokens).sum())
            if found != count:
                raise ValueError(f"adapter_ids has {count} entries but the batch's position_ids hold {found} "
                                 "sequences: give one adapter index per packed sequence")
        return cu_seqlens[:count + 1]
    if cu_seqlens.shape[0] - 1 != count:
        where = ("cu_seq_lens_q holds" if source == "cu_seq_lens_q" else
                 "the batch has no cu_seq_lens_q / position_ids marking packed sequences and has")
        raise ValueError(f"adapter_ids has {count} entries but {where} {cu_seqlens.shape[0] - 1} sequences: "
                         "give one adapter index per packed sequence (per row of a plain batch)")
    return cu_seqlens


def _boundaries_hook(batch_state: _Batch) -> Callable:
    def take_boundaries(module, args, kwargs):
        batch, length, device = _input_shape(args, kwargs)
        batch_state.cu_seqlens = _all_offsets(kwargs, batch, length, device)[0]
        batch_state.tokens = batch * length

    return take_boundaries


def _batch_hook(batch_state: _Batch, num_adapters: int) -> Callable:
    def take_adapter_ids(module, args, kwargs):
        adapter_ids = kwargs.pop("adapter_ids", None)
        batch_state.adapter_ids = batch_state.cu_seqlens = None
        if adapter_ids is not None:
            batch, length, device = _input_shape(args, kwargs)
            adapter_ids = _as_adapter_ids(adapter_ids, num_adapters, device)
            batch_state.cu_seqlens = _sequence_offsets(kwargs, batch, length, device, adapter_ids.shape[0])
            batch_state.adapter_ids = adapter_ids
            batch_state.tokens = batch * length
        return args, kwargs

    return take_adapter_ids


def _check_tokens(x: torch.Tensor, batch_state: _Batch) -> None:
    tokens = x.numel() // x.shape[-1]
    if tokens != batch_state.tokens:
        raise ValueError(f"a LoRA layer got {tokens} tokens but the model's forward had {batch_state.tokens}: "
                         "a layer patched by padfree's adapters runs only inside the model's forward")


def _per_sequence_forward(module, names: list[str], batch_state: _Batch) -> Callable:
    def forward(x, *args, **kwargs):
        if module.disable_adapters:
            return module.base_layer(x, *args, **kwargs)
        _refuse_state(module, args, kwargs)
        if batch_state.adapter_ids is None:
            raise ValueError("this model runs several LoRA adapters per sequence (padfree.hf.multi_adapter): its "
                             "forward needs adapter_ids, one adapter index per packed sequence (e.g. from "
                             "PaddingFreeCollator(adapter_key='adapter_id'))")
        _check_tokens(x, batch_state)
        base = module.get_base_layer()
        lora_a, lora_b, scaling = stack_adapters(module, names)
        return lora_per_sequence_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, batch_state.adapter_ids,
                                        batch_state.cu_seqlens, _dropout_p(module, _held_adapter(module, names)),
                                        check=False)

    return forward


def _replace(obj, attribute: str, value, undo: list[Callable[[], None]]) -> None:
    """Set an instance attribute and append the closure restoring exactly what was there."""
    had = attribute in obj.__dict__
    previous = obj.__dict__.get(attribute)

    def restore():
        if had:
            obj.__dict__[attribute] = previous
        else:
            obj.__dict__.pop(attribute, None)

    obj.__dict__[attribute] = value
    undo.append(restore)


def _keep_requires_grad(parameters: list[torch.nn.Parameter], undo: list[Callable[[], None]]) -> None:
    previous = [(p, p.requires_grad) for p in parameters]

    def restore():
        for p, flag in previous:
            p.requires_grad_(flag)

    undo.append(restore)


def _adapter_parameters(layers: dict[str, torch.nn.Module], names: list[str]) -> list[torch.nn.Parameter]:
    return [p for module in layers.values() for name in names if name in module.lora_A
            for p in (*module.lora_A[name].parameters(), *module.lora_B[name].parameters())]


def _activate_all(model, names: list[str], undo: list[Callable[[], None]]) -> None:
    """Make every adapter active in PEFT's sense, so that `padfree.patch(model, lora=True)` sees
    several active adapters and leaves these layers alone; undo restores the previous ones."""
    tuner = getattr(model, "base_model", None)
    if not hasattr(tuner, "set_adapter") or not hasattr(tuner, "active_adapter"):
        return
    previous = tuner.active_adapter
    tuner.set_adapter(list(names))
    undo.append(lambda: tuner.set_adapter(previous))


def _patch(model, names, layers, make_forward, trainable_parameters, frozen_parameters, extra=None):
    # A forward already set on the instance is someone else's patch (padfree.patch(lora=True) sets
    # one); replacing it would let that patch's undo restore it over ours later.
    replaced = [name for name, module in layers.items() if "forward" in module.__dict__]
    if replaced:
        raise ValueError(f"the forward of {', '.join(replaced[:3])}{' ...' if len(replaced) > 3 else ''} is already "
                         "replaced (e.g. by padfree.patch(model, lora=True)): call padfree.unpatch(model) first; "
                         "padfree.patch after this call leaves these layers alone")
    undo: list[Callable[[], None]] = []
    try:
        # restored last: PEFT's set_adapter (here and in the undo of _activate_all) sets the flags
        # of every adapter in the model, these ones or not
        _keep_requires_grad(list(model.parameters()), undo)
        _activate_all(model, names, undo)
        if extra is not None:
            extra(undo)
        for p in frozen_parameters:
            p.requires_grad_(False)
        for p in trainable_parameters:
            p.requires_grad_(True)
        for module in layers.values():
            _replace(module, "forward", make_forward(module), undo)
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    object.__setattr__(model, _STATE_ATTR, undo)


def multi_adapter(model: torch.nn.Module, adapters: Sequence[str | os.PathLike], trainable: bool = True
                  ) -> torch.nn.Module:
    """Run N PEFT LoRA adapters on one base, one adapter per packed sequence.

    Args:
        model: a `peft.PeftModel` (or a transformers model, when every adapter is given as a path).
        adapters: adapter names loaded in `model`, or paths of saved PEFT adapters (loaded under
            their directory's name); adapter i of the list is adapter index i in `adapter_ids`.
        trainable: make every adapter's LoRA weights require grad (PEFT trains only the active one);
            False leaves them frozen.

    Returns the model (the PeftModel the paths were loaded into, when `model` was not one). Its
    forward takes `adapter_ids` (B,) int, one adapter index per packed sequence: the sequences come
    from `cu_seq_lens_q`, else from where `position_ids` restart, else one per row, so this works
    with `PaddingFreeCollator(adapter_key="adapter_id")`, with packed `position_ids` and with plain
    (B, S) batches. Every adapted Linear runs `padfree.lora_per_sequence_linear`; each adapter's
    gradient comes only from its own sequences, and an adapter no sequence uses gets zero.

    The adapters of a layer may differ in rank, alpha and target modules but must share the LoRA
    dropout p. Raises ValueError listing the layers it cannot run (Embedding / Conv LoRA, DoRA,
    quantized or merged base layers, modules_to_save), and at forward time for missing adapter_ids,
    an adapter index out of range, or a sequence count that does not match. Patch attention with
    `padfree.patch(model, lora=False)`; `unpatch_adapters(model)` restores the layers. A model
    already patched by `multi_adapter` / `mixture_of_adapters` is unpatched first.
    """
    unpatch_adapters(model)
    model, names = _resolve_adapters(model, adapters)
    layers = _adapted_layers(model, names)
    batch_state = _Batch()
    parameters = _adapter_parameters(layers, names)

    def hook(undo):
        undo.append(model.register_forward_pre_hook(_batch_hook(batch_state, len(names)), with_kwargs=True).remove)

    _patch(model, names, layers, lambda m: _per_sequence_forward(m, names, batch_state),
           parameters if trainable else [], [] if trainable else parameters, hook)
    return model


def _sequence_routing(router: torch.nn.Module, x2d: torch.Tensor, cu_seqlens: torch.Tensor, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every packed sequence by the mean of its tokens' inputs; each token takes its sequence's
    (weights, experts). Tokens past cu_seqlens[-1] (padding) get weight 0. No host sync."""
    num_tokens, sequences = x2d.shape[0], cu_seqlens.shape[0] - 1
    positions = torch.arange(num_tokens, device=x2d.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    inside = sequence < sequences
    sequence = sequence.clamp_max(sequences - 1)
    sums = x2d.new_zeros(sequences, x2d.shape[1]).index_add(0, sequence, x2d * inside[:, None].to(x2d.dtype))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp_min(1)  # an empty sequence routes no token
    top_k_weights, top_k_index = moe_route(router(sums / lengths[:, None].to(x2d.dtype)), top_k)
    return top_k_weights[sequence] * inside[:, None], top_k_index[sequence]


def _route(module, x: torch.Tensor, num_adapters: int, top_k: int, batch_state: _Batch | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) of the layer's router for input x (per token, or per sequence
    with a batch_state)."""
    router = getattr(module, ROUTER_ATTR)
    if batch_state is None:
        top_k_weights, top_k_index = moe_route(router(x).reshape(-1, num_adapters), top_k)
    else:
        _check_tokens(x, batch_state)
        top_k_weights, top_k_index = _sequence_routing(router, x.reshape(-1, x.shape[-1]), batch_state.cu_seqlens,
                                                       top_k)
    return top_k_index, top_k_weights


def _mixture_forward(module, names: list[str], top_k: int, batch_state: _Batch | None) -> Callable:
    def forward(x, *args, **kwargs):
        if module.disable_adapters:
            return module.base_layer(x, *args, **kwargs)
        _refuse_state(module, args, kwargs)
        base = module.get_base_layer()
        top_k_index, top_k_weights = _route(module, x, len(names), top_k, batch_state)
        lora_a, lora_b, scaling = stack_adapters(module, names)
        # moe_route's experts are in range by construction: skip the op's host-side index check
        return lora_mixture_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, top_k_index, top_k_weights,
                                   _dropout_p(module, _held_adapter(module, names)), check=False)

    return forward


def _mixture_group_outputs(members: list, names: list[str], top_k: int, batch_state: _Batch | None) -> Callable:
    """Every member's output of a q/k/v or gate/up group in one `lora_mixture_linear_shared` call (one
    pass over x), or None when a member runs otherwise now (adapters disabled, merged, or the
    members' dropout p differ, e.g. one in eval mode): then each runs `_mixture_forward`."""
    def compute(x):
        if any(m.disable_adapters or m.merged for m in members):
            return None
        dropouts = {_dropout_p(m, _held_adapter(m, names)) for m in members}
        if len(dropouts) != 1:
            return None
        layers = []
        for module in members:
            base = module.get_base_layer()
            layers.append((base.weight, base.bias, *stack_adapters(module, names),
                           *_route(module, x, len(names), top_k, batch_state)))
        weights, biases, lora_as, lora_bs, scalings, indices, gates = (list(column) for column in zip(*layers))
        return lora_mixture_linear_shared(x, weights, biases, lora_as, lora_bs, scalings, indices, gates,
                                          dropouts.pop(), check=False)

    return compute


def _mixture_group_key(names: list[str]) -> Callable:
    """Members of a group read one x (in_features) in one dtype, with one configured dropout p."""
    def key(module):
        dropout = module.lora_dropout[_held_adapter(module, names)]
        base = module.get_base_layer()
        return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0, base.weight.dtype, base.in_features

    return key


def _mixture_forwards(layers: dict[str, torch.nn.Module], names: list[str], top_k: int,
                      batch_state: _Batch | None) -> dict[str, Callable]:
    """Qualified name -> the forward of every layer: q/k/v and gate/up siblings (hf/lora.py's
    SHARED_GROUPS) as one shared-input group, the others alone."""
    forwards = {name: _mixture_forward(module, names, top_k, batch_state) for name, module in layers.items()}
    for group_names in find_groups(layers, _mixture_group_key(names)):
        members = [layers[n] for n in group_names]
        group = SharedGroup(_mixture_group_outputs(members, names, top_k, batch_state))
        for index, name in enumerate(group_names):
            forwards[name] = group_forward(group, index, forwards[name])
    return forwards


def routers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Qualified name -> router of every layer `mixture_of_adapters` patched in `model`."""
    return {name: m for name, m in model.named_modules() if name.rpartition(".")[2] == ROUTER_ATTR}


def _saving_routers(model, names: list[str], top_k: int, router: str, original: Callable) -> Callable:
    def save_pretrained(save_directory, *args, **kwargs):
        """PEFT's save_pretrained (each adapter as a PEFT adapter), then the routers beside them."""
        result = original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from safetensors.torch import save_file

            directory = Path(save_directory)
            weights = {f"{name}.weight": m.weight.detach().contiguous() for name, m in routers(model).items()}
            save_file(weights, directory / ROUTER_WEIGHTS)
            (directory / MIXTURE_CONFIG).write_text(json.dumps(
                {"adapters": names, "top_k": top_k, "router": router}, indent=2) + "\n")
        return result

    return save_pretrained


def _check_mixture_options(top_k, router, trainable, num_adapters: int | None = None) -> None:
    if router not in ("token", "sequence"):
        raise ValueError(f"router must be 'token' (each token routed) or 'sequence' (each packed sequence routed), "
                         f"got {router!r}")
    if trainable not in ("router", "all"):
        raise ValueError(f"trainable must be 'router' (adapters frozen) or 'all' (router and adapters), "
                         f"got {trainable!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if num_adapters is not None and top_k > num_adapters:
        raise ValueError(f"top_k={top_k} is more than the {num_adapters} adapters")


def mixture_of_adapters(model: torch.nn.Module, adapters: Sequence[str | os.PathLike], top_k: int = 2,
                        router: str = "token", trainable: str = "router") -> torch.nn.Module:
    """Make N PEFT LoRA adapters on one base a mixture of LoRA experts with a router per layer.

    Args:
        model: a `peft.PeftModel` (or a transformers model, when every adapter is given as a path).
        adapters: adapter names loaded in `model`, or paths of saved PEFT adapters (loaded under
            their directory's name); they are the experts 0..N-1 of every router.
        top_k: adapters mixed per token, 1..N.
        router: every adapted Linear gets a router `torch.nn.Linear(in_features, N, bias=False)`
            (torch's default init, in the base weight's dtype and device); `padfree.moe_route`
            takes the softmax's top-k of its scores, renormalised, and the layer runs
            `padfree.lora_mixture_linear` (q/k/v and gate/up siblings: one
            `padfree.lora_mixture_linear_shared` call per group, each with its own router):
                y = base(x) + sum_j w_j * scale_{e_j} * B_{e_j} A_{e_j} dropout(x)
            "token": the router scores each token's input x. "sequence": it scores the mean of x
            over each packed sequence (sequences as `multi_adapter` finds them: `cu_seq_lens_q`,
            `position_ids` restarts or rows), and every token of the sequence takes that choice.
            The mean is over the tokens of the current forward, so a sequence router is for
            whole-sequence forwards (training, scoring), not for generation with a KV cache.
        trainable: "router": only the routers train, the adapters are frozen; "all": routers and
            adapters train.

    Returns the model (the PeftModel the paths were loaded into, when `model` was not one). Its
    `save_pretrained(directory)` (what HF `Trainer` calls) saves each adapter as a PEFT adapter
    (the "default" adapter in `directory`, the others in `directory/<name>`, PEFT's layout), the
    routers in `padfree_router.safetensors` and the mixture's settings in `padfree_mixture.json`;
    `load_mixture_of_adapters` loads it back, `unpatch_adapters` removes the routers and restores
    PEFT's layers. The adapters of a layer may differ in rank, alpha and target modules (see
    `multi_adapter` for what is refused). A model already patched by `multi_adapter` /
    `mixture_of_adapters` is unpatched first.
    """
    _check_mixture_options(top_k, router, trainable)
    unpatch_adapters(model)
    model, names = _resolve_adapters(model, adapters)
    _check_mixture_options(top_k, router, trainable, len(names))
    layers = _adapted_layers(model, names)
    batch_state = _Batch() if router == "sequence" else None

    def attach_routers(undo):
        for module in layers.values():
            base = module.get_base_layer()
            module.add_module(ROUTER_ATTR, torch.nn.Linear(base.in_features, len(names), bias=False,
                                                           device=base.weight.device, dtype=base.weight.dtype))
            undo.append(lambda m=module: delattr(m, ROUTER_ATTR))
        _replace(model, "save_pretrained", _saving_routers(model, names, top_k, router, model.save_pretrained), undo)
        if batch_state is not None:
            undo.append(model.register_forward_pre_hook(_boundaries_hook(batch_state), with_kwargs=True).remove)

    parameters = _adapter_parameters(layers, names)
    forwards = _mixture_forwards(layers, names, top_k, batch_state)
    by_module = {id(module): forwards[name] for name, module in layers.items()}
    _patch(model, names, layers, lambda m: by_module[id(m)], parameters if trainable == "all" else [],
           [] if trainable == "all" else parameters, attach_routers)
    return model


def load_mixture_of_adapters(model: torch.nn.Module, directory: str | os.PathLike, trainable: str = "router"
                             ) -> torch.nn.Module:
    """Load what a mixture's `save_pretrained(directory)` wrote onto `model` (the base model, a
    transformers model with none of these adapters loaded, or a PeftModel of that base): the
    adapters, the mixture (same adapters, top_k and router) and the router weights. `trainable`
    as in `mixture_of_adapters`. Returns the PeftModel."""
    directory = Path(directory)
    if not (directory / MIXTURE_CONFIG).is_file() or not (directory / ROUTER_WEIGHTS).is_file():
        raise ValueError(f"{str(directory)!r} holds no saved mixture of adapters ({MIXTURE_CONFIG} and "
                         f"{ROUTER_WEIGHTS}, written by the save_pretrained of a mixture_of_adapters model)")
    settings = json.loads((directory / MIXTURE_CONFIG).read_text())
    names = settings["adapters"]
    for name in names:
        if name in _loaded_adapters(model):
            raise ValueError(f"adapter {name!r} is already loaded in the model; load the mixture onto the base model")
        model = _load_adapter(model, str(directory if name == "default" else directory / name), name, True)
    model = mixture_of_adapters(model, names, settings["top_k"], settings["router"], trainable)
    from safetensors.torch import load_file

    saved = load_file(directory / ROUTER_WEIGHTS)
    found = {f"{name}.weight": m.weight for name, m in routers(model).items()}
    if saved.keys() != found.keys():
        unpatch_adapters(model)
        raise ValueError(f"the saved routers do not fit this model: missing {sorted(found.keys() - saved.keys())}, "
                         f"unexpected {sorted(saved.keys() - found.keys())} (another base model?)")
    with torch.no_grad():
        for key, weight in found.items():
            weight.copy_(saved[key])
    return model


def unpatch_adapters(model: torch.nn.Module) -> None:
    """Undo `multi_adapter` / `mixture_of_adapters` on `model` (layers' forward, routers, hooks,
    requires_grad flags, PEFT's active adapters, save_pretrained); the adapters keep their trained
    weights. A model not patched by them is left as is."""
    run_undo(model, _STATE_ATTR)
