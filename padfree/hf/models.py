"""Which transformers models padfree's attention serves, decided by capability, and tiny configs.

`refusal(model)` says why a model cannot be served exactly (None when it can): a model is served
when its attention layers dispatch through transformers' AttentionInterface with flash-attention
semantics; refused are layers that mix tokens outside attention (from config.layer_types and the
modules themselves, other modalities' encoders left out), positions that ignore packed
position_ids, cross-attention, and the few genuine exceptions in EXCEPTIONS. `attention_modules(model)` lists the layers that call padfree.

`tiny_config(model_type)` shrinks any causal-LM type's default config for the sweep and tests;
`ARCHITECTURES` holds hand-made presets that exercise given attention options (a sliding window
shorter than the test sequences, a softcap small enough to bend the scores, a few experts). No
model's forward is copied: transformers' own attention modules call padfree through
`AttentionInterface`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Architecture:
    model_type: str                   # config.model_type
    config_class: str                 # transformers config class
    causal_lm_class: str              # transformers *ForCausalLM class
    features: tuple[str, ...] = ()    # attention options beyond causal GQA the architecture uses
    tiny: dict = field(default_factory=dict)  # overrides on top of TINY for a small random model

    def build_config(self, full_size: bool = False, **overrides):
        """The config for a random-weight model: tiny (TINY + `tiny`) unless `full_size`."""
        import transformers

        values = {} if full_size else {**TINY, **self.tiny}
        values.update(overrides)
        return getattr(transformers, self.config_class)(**values)

    def build_model(self, full_size: bool = False, attn_implementation: str = "eager", dtype=torch.float32,
                    **overrides) -> torch.nn.Module:
        """A random-weight *ForCausalLM of this architecture, in eval mode."""
        import transformers

        config = self.build_config(full_size, **overrides)
        config._attn_implementation = attn_implementation
        model = getattr(transformers, self.causal_lm_class)(config).to(dtype)
        return model.eval()


# Small enough that the Triton interpreter runs a whole model in seconds; two layers so a
# sliding-window layer and a global one can both be present.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
TINY_WINDOW = 4  # shorter than the test sequences, so the window changes the result
TINY_MOE = dict(num_experts_per_tok=2)

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (
    Architecture("llama", "LlamaConfig", "LlamaForCausalLM"),
    Architecture("mistral", "MistralConfig", "MistralForCausalLM", ("sliding_window",),
                 dict(sliding_window=TINY_WINDOW)),
    Architecture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", ("sliding_window",),
                 dict(use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"])),
    Architecture("qwen3", "Qwen3Config", "Qwen3ForCausalLM", ("sliding_window", "qk_norm"),
                 dict(head_dim=16, use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"])),
    Architecture("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
                 ("sliding_window", "softcap", "scaling"),
                 dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=TINY_WINDOW, attn_logit_softcapping=0.5,
                      final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"])),
    Architecture("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
                 ("sliding_window", "qk_norm", "scaling"),
                 dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=TINY_WINDOW,
                      layer_types=["sliding_attention", "full_attention"])),
    Architecture("phi3", "Phi3Config", "Phi3ForCausalLM", ("sliding_window",),
                 dict(sliding_window=TINY_WINDOW)),
    Architecture("granite", "GraniteConfig", "GraniteForCausalLM", ("scaling",),
                 dict(attention_multiplier=0.3, logits_scaling=2.0, residual_multiplier=0.5,
                      embedding_multiplier=2.0)),
    Architecture("olmo2", "Olmo2Config", "Olmo2ForCausalLM", ("qk_norm",)),
    Architecture("mixtral", "MixtralConfig", "MixtralForCausalLM", ("sliding_window", "moe"),
                 dict(TINY_MOE, num_local_experts=4, sliding_window=TINY_WINDOW)),
    Architecture("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 ("sliding_window", "moe"),
                 dict(TINY_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                      use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=2)),
    Architecture("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("qk_norm", "moe"),
                 dict(TINY_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32)),
    Architecture("olmoe", "OlmoeConfig", "OlmoeForCausalLM", ("qk_norm", "moe"),
                 dict(TINY_MOE, num_experts=4)),
    Architecture("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM",
                 ("scaling", "moe"),
                 dict(TINY_MOE, num_local_experts=4, attention_multiplier=0.3, logits_scaling=2.0)),
)}

# Genuine per-model exceptions: what the structural checks in `refusal` cannot see.
EXCEPTIONS: dict[str, str] = {
    "gemma3": "multimodal Gemma3: image tokens attend bidirectionally through a custom mask; "
              "load the text model (Gemma3ForCausalLM, model_type gemma3_text) instead",
    "gemma4_assistant": "a speculative-decoding draft model: its forward needs the main model's inputs_embeds and "
                        "shared_kv_states, there is no causal LM over input_ids to train",
    "gemma4_unified_assistant": "a speculative-decoding draft model: its forward needs the main model's "
                                "inputs_embeds and shared_kv_states, there is no causal LM over input_ids to train",
    "gemma3n_text": "a padded batch gives NaN gradients: padding rows' attention output is exactly zero (as in "
                    "flash-attention) and Gemma 3n's layers take a gradient through its norm",
}

# Layer types (config.layer_types) that act on each token alone or through attention; any other
# (linear_attention, conv, hybrid, ...) mixes tokens outside attention, across packed sequences.
TOKEN_WISE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "mlp", "moe"})
# Sequence mixers outside attention, by module class name fragment (state-space, recurrent,
# linear attention); depthwise causal convolutions are found by type (nn.Conv1d, kernel > 1).
MIXER_CLASS_FRAGMENTS = ("Mamba", "Mixer", "Recurrent", "RGLRU", "GatedDeltaNet", "LinearAttention", "ShortConv",
                         "LightningAttention", "Lstm", "LSTM")

_DISPATCHES: dict[type, bool] = {}


def _dispatches_attention(cls: type) -> bool:
    """Whether `cls.forward` looks its attention function up in transformers' AttentionInterface."""
    if cls not in _DISPATCHES:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _DISPATCHES[cls]


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules of `model` that call their attention through `ALL_ATTENTION_FUNCTIONS`."""
    return [(name, m) for name, m in model.named_modules() if _dispatches_attention(type(m))]


def exception(model_type: str | None) -> str | None:
    """The EXCEPTIONS entry for `model_type`, as a refusal reason; None when it has none."""
    return f"model type {model_type!r}: {EXCEPTIONS[model_type]}" if model_type in EXCEPTIONS else None


def config_refusal(config) -> str | None:
    """What `refusal` can tell from the config alone (the EXCEPTIONS table, layer types that mix
    tokens): the check a model loaded with attn_implementation="padfree" gets at its first call."""
    reason = exception(getattr(config, "model_type", None))
    if reason is not None:
        return reason
    layer_types = getattr(config, "layer_types", None) or ()
    mixing = sorted({t for t in layer_types if t not in TOKEN_WISE_LAYER_TYPES})
    if mixing:
        return (f"layer types {', '.join(map(repr, mixing))} (config.layer_types) mix tokens outside attention, "
                "across the packed sequences")
    return None


def _other_modality_towers(model: torch.nn.Module) -> list[str]:
    """Name prefixes of the sub-models built from a config other than the text model's (a multimodal
    model's vision or audio encoder): they run on their own inputs (pixels, audio frames), never on
    the packed token row, and not at all for a text-only batch."""
    from transformers import PreTrainedModel

    text_config = model.config.get_text_config()
    return [f"{name}." for name, module in model.named_modules() if isinstance(module, PreTrainedModel)
            and module.config is not model.config and module.config is not text_config]


def _sequence_mixer(model: torch.nn.Module) -> str | None:
    towers = _other_modality_towers(model)
    for name, module in model.named_modules():
        if any(f"{name}.".startswith(prefix) for prefix in towers):
            continue
        class_name = type(module).__name__
        if any(fragment in class_name for fragment in MIXER_CLASS_FRAGMENTS):
            return f"{class_name} ({name})"
        if isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1:
            return f"a convolution over the sequence ({name}, kernel {module.kernel_size[0]})"
        if isinstance(module, torch.nn.RNNBase):
            return f"a recurrent layer ({name})"
    return None


def _takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether position_ids reach the model's positions: a forward parameter, or transformers' typed
    **kwargs (TransformersKwargs, which carry position_ids) passed on to a text decoder
    (model.get_decoder(), e.g. a multimodal model's language model) that takes them. Untyped
    **kwargs (WhisperForCausalLM) are not known to pass anything on."""
    parameters = inspect.signature(type(model).forward).parameters
    if "position_ids" in parameters:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD and "TransformersKwargs" in str(p.annotation)
               for p in parameters.values()):
        return False
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not model and "position_ids" in inspect.signature(type(decoder).forward).parameters


def _position_problem(model: torch.nn.Module) -> str | None:
    if not _takes_position_ids(model):
        return (f"{type(model).__name__}.forward takes no position_ids: its positions (learned absolute in the "
                "BART family) run over the whole row and cannot restart at each packed sequence")
    for name, module in model.named_modules():
        if hasattr(type(module), "create_position_ids_from_input_ids"):
            return (f"{type(module).__name__} ({name}) numbers positions from padding_idx + 1 over non-padding "
                    "tokens, which packed position_ids (0, 1, ... per sequence) do not reproduce")
    return None


def refusal(model: torch.nn.Module) -> str | None:
    """Why padfree's attention cannot serve the transformers model `model` exactly; None when it can.

    Served: a model whose attention layers dispatch through transformers' AttentionInterface with
    flash-attention semantics (`_supports_flash_attn`), so every per-layer option reaches padfree
    at call time. Refused: what packing would make wrong outside attention (sequence mixers,
    positions that ignore position_ids), cross-attention, and the EXCEPTIONS table.
    """
    cls = type(model)
    if not getattr(cls, "_supports_flash_attn", False):
        return (f"{cls.__name__} does not declare flash-attention support (_supports_flash_attn): its attention "
                "may rely on a 4D mask that packed sequences cannot express")
    from_config = config_refusal(model.config)
    if from_config is not None:
        return from_config
    if not cls._can_set_attn_implementation():
        return f"{cls.__name__}'s attention does not go through transformers' AttentionInterface"
    if getattr(model.config, "add_cross_attention", False) or getattr(model.config, "is_encoder_decoder", False) \
            and not getattr(model.config, "is_decoder", False):
        return "cross-attention: keys from another sequence have no packed boundaries padfree could use"
    mixer = _sequence_mixer(model)
    if mixer is not None:
        return f"{mixer} mixes tokens outside attention, across the packed sequences"
    positions = _position_problem(model)
    if positions is not None:
        return positions
    if not attention_modules(model):
        return f"no module of {cls.__name__} calls its attention through ALL_ATTENTION_FUNCTIONS"
    return None


# `tiny_config`: sizes set on any config that has the attribute (aliases through attribute_map too).
TINY_GENERIC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=128, tie_word_embeddings=False,
                    # mixture of experts
                    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
                    num_experts_per_tok=2, moe_k=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                    n_shared_experts=1,
                    n_group=1, topk_group=1,
                    # multi-head latent attention: a value head dim unlike the query's
                    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                    # encoder-decoder families' decoders and older naming
                    d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2,
                    encoder_attention_heads=4, encoder_ffn_dim=128, ffn_dim=128, num_layers=2,
                    # layers that reuse another layer's keys/values (Gemma 3n): none left with two layers
                    num_kv_shared_layers=0, vocab_size_per_layer_input=128)
TINY_IF_SET = dict(q_lora_rank=16, sliding_window=TINY_WINDOW, attention_chunk_size=TINY_WINDOW, rotary_dim=8)
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _settable(config_class: type, key: str) -> bool:
    """False for a read-only property (e.g. a head_dim the config derives)."""
    attribute = getattr(config_class, key, None)
    return not isinstance(attribute, property) or attribute.fset is not None


def _representative_layer_types(layer_types) -> list[str] | None:
    """One layer of every distinct type, in order of first appearance (at least two layers)."""
    if not layer_types:
        return None
    distinct = list(dict.fromkeys(layer_types))
    return (distinct * 2)[: max(2, len(distinct))]


# Types whose default config leaves out a kind of layer their released checkpoints have.
TINY_LAYER_TYPES = {"lfm2": ["conv", "full_attention"], "lfm2_moe": ["conv", "full_attention"]}
# Types whose config spells its layer pattern in its own way.
# A dict value for a sub-config key is merged into that sub-config's tiny values.
TINY_OVERRIDES = {"gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
                  "gemma4_text": dict(global_head_dim=32), "gemma4_unified_text": dict(global_head_dim=32),
                  # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define (the
                  # rotary embedding uses config.rope_parameters), and clamps with clip_qkv, which fails on the
                  # default None; released DBRX config.json files set both (clip_qkv 8)
                  "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0)),
                  # the default config has no per-layer-type rope parameters, which the rotary embedding needs
                  "cohere_compass_text": dict(
                      layer_types=["sliding_attention", "full_attention"],
                      rope_parameters={layer_type: dict(rope_type="default", rope_theta=10000.0)
                                       for layer_type in ("sliding_attention", "full_attention")}),
                  # input / recurrent (looped) / output sections must add up to the two tiny layers
                  "dory": dict(n_input_layers=0, n_recurrent_layers=1, n_output_layers=1)}


_MISSING = object()


def _default(config, key: str):
    """config.key, or _MISSING; a config with per-layer values refuses the global read (not an
    AttributeError), so its to_dict() is asked then."""
    try:
        return getattr(config, key, _MISSING)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        return config.to_dict().get(key, _MISSING)


def _tiny_values(default) -> dict:
    """The size overrides for a config like `default` (its sub-configs, e.g. a multimodal model's
    text and vision towers, made tiny the same way)."""
    config_class = type(default)
    values = {key: value for key, value in TINY_GENERIC.items()
              if _default(default, key) is not _MISSING and _settable(config_class, key)}
    values.update({key: value for key, value in TINY_IF_SET.items() if _default(default, key) not in (None, _MISSING)})
    values.update({key: value for key, value in TOKEN_IDS.items() if _default(default, key) not in (None, _MISSING)})
    if "kv_lora_rank" in values:  # MLA: keys and values expand to every query head; rotary on head_dim channels
        values.update(num_key_value_heads=values["num_attention_heads"])
        if "head_dim" in values:
            values["head_dim"] = values["qk_rope_head_dim"]
    for key in getattr(default, "sub_configs", {}):
        sub = _default(default, key)
        if hasattr(sub, "to_dict"):
            values[key] = {**sub.to_dict(), **_tiny_values(sub)}
            layer_types = _representative_layer_types(values[key].get("layer_types"))
            if layer_types is not None and "num_hidden_layers" in values[key]:
                values[key].update(layer_types=layer_types, num_hidden_layers=len(layer_types))
    return values


def tiny_config(model_type: str, config_class: type | None = None, **overrides):
    """`model_type`'s default transformers config with its sizes made tiny, keeping every kind of
    layer it has (config.layer_types, or TINY_LAYER_TYPES), a sliding window shorter than the test
    sequences and a few experts; `overrides` last. `config_class`: the one the model class takes
    when it is not CONFIG_MAPPING's (a text-only causal LM of a multimodal type). Where the config
    rejects some of that, fewer overrides are tried (down to the core sizes); raises what
    transformers raised on the first try when none builds."""
    from transformers import CONFIG_MAPPING

    config_class = config_class or CONFIG_MAPPING[model_type]
    default = config_class()
    if model_type in TINY_LAYER_TYPES:
        overrides = {"layer_types": TINY_LAYER_TYPES[model_type], **overrides}
    overrides = {**TINY_OVERRIDES.get(model_type, {}), **overrides}
    layer_types = _default(default, "layer_types")
    layer_types = _representative_layer_types(overrides.pop("layer_types", None if layer_types is _MISSING
                                                            else layer_types))
    values = _tiny_values(default)
    values.update({key: {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict)
                   else value for key, value in overrides.items()})
    attempts = [values, {key: values[key] for key in (*_ALWAYS_SHRUNK, *overrides) if key in values}]
    if layer_types is not None:
        attempts.insert(0, {**values, "layer_types": layer_types, "num_hidden_layers": len(layer_types)})
    first_error = None
    for attempt in attempts:
        try:
            return config_class(**attempt)
        except Exception as error:  # noqa: BLE001 - a config's validators raise many kinds
            first_error = first_error or error
    raise first_error


_ALWAYS_SHRUNK = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")


def shrink(values: dict) -> dict:
    """A config dict (config.json) with its sizes made tiny (TINY_GENERIC, for the keys it has);
    attention options (window, softcap, scaling, one layer of every kind) are kept."""
    small = {**values, **{key: TINY_GENERIC[key] for key in _ALWAYS_SHRUNK}, **TOKEN_IDS}
    small.update({key: size for key, size in TINY_GENERIC.items() if key in values})
    if "num_experts_per_tok" in values:
        small["num_experts_per_tok"] = min(values["num_experts_per_tok"], TINY_GENERIC["num_experts_per_tok"])
    if "kv_lora_rank" in values:
        small.update(num_key_value_heads=small["num_attention_heads"], head_dim=small["qk_rope_head_dim"])
    layer_types = _representative_layer_types(values.get("layer_types"))
    if layer_types is not None:
        small.update(layer_types=layer_types, num_hidden_layers=len(layer_types))
    return small
