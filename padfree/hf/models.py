"""The architectures padfree's attention adapter serves, and the ones it does not, in one table.

Every per-model difference the adapter, `padfree verify` and the model tests need lives here: the
transformers classes, which attention options the architecture exercises, and the config
overrides that make a tiny random model which still exercises them (a sliding window shorter than
the test sequences, an attention softcap small enough to bend the scores, a few experts). No
model's forward is copied: transformers' own attention modules call padfree through
`AttentionInterface`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Architecture:
    model_type: str                   # config.model_type
    config_class: str                 # transformers config class
    causal_lm_class: str              # transformers *ForCausalLM class
    attention_classes: tuple[str, ...]  # the attention modules that call ALL_ATTENTION_FUNCTIONS
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
    Architecture("llama", "LlamaConfig", "LlamaForCausalLM", ("LlamaAttention",)),
    Architecture("mistral", "MistralConfig", "MistralForCausalLM", ("MistralAttention",), ("sliding_window",),
                 dict(sliding_window=TINY_WINDOW)),
    Architecture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", ("Qwen2Attention",), ("sliding_window",),
                 dict(use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"])),
    Architecture("qwen3", "Qwen3Config", "Qwen3ForCausalLM", ("Qwen3Attention",), ("sliding_window", "qk_norm"),
                 dict(head_dim=16, use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"])),
    Architecture("gemma2", "Gemma2Config", "Gemma2ForCausalLM", ("Gemma2Attention",),
                 ("sliding_window", "softcap", "scaling"),
                 dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=TINY_WINDOW, attn_logit_softcapping=0.5,
                      final_logit_softcapping=5.0, layer_types=["sliding_attention", "full_attention"])),
    Architecture("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", ("Gemma3Attention",),
                 ("sliding_window", "qk_norm", "scaling"),
                 dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=TINY_WINDOW,
                      layer_types=["sliding_attention", "full_attention"])),
    Architecture("phi3", "Phi3Config", "Phi3ForCausalLM", ("Phi3Attention",), ("sliding_window",),
                 dict(sliding_window=TINY_WINDOW)),
    Architecture("granite", "GraniteConfig", "GraniteForCausalLM", ("GraniteAttention",), ("scaling",),
                 dict(attention_multiplier=0.3, logits_scaling=2.0, residual_multiplier=0.5,
                      embedding_multiplier=2.0)),
    Architecture("olmo2", "Olmo2Config", "Olmo2ForCausalLM", ("Olmo2Attention",), ("qk_norm",)),
    Architecture("mixtral", "MixtralConfig", "MixtralForCausalLM", ("MixtralAttention",), ("sliding_window", "moe"),
                 dict(TINY_MOE, num_local_experts=4, sliding_window=TINY_WINDOW)),
    Architecture("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", ("Qwen2MoeAttention",),
                 ("sliding_window", "moe"),
                 dict(TINY_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                      use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=2)),
    Architecture("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("Qwen3MoeAttention",), ("qk_norm", "moe"),
                 dict(TINY_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32)),
    Architecture("olmoe", "OlmoeConfig", "OlmoeForCausalLM", ("OlmoeAttention",), ("qk_norm", "moe"),
                 dict(TINY_MOE, num_experts=4)),
    Architecture("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", ("GraniteMoeAttention",),
                 ("scaling", "moe"),
                 dict(TINY_MOE, num_local_experts=4, attention_multiplier=0.3, logits_scaling=2.0)),
)}

# Architectures known not to fit padfree's attention, and why (checked against transformers 5).
UNSUPPORTED: dict[str, str] = {
    "gpt_oss": "attention sinks (s_aux) are not supported by padfree.varlen_attention",
    "deepseek_v3": "multi-head latent attention: value head_dim differs from the query/key head_dim",
    "gemma3": "multimodal Gemma3: image tokens attend bidirectionally through a custom mask; "
              "load the text model (Gemma3ForCausalLM, model_type gemma3_text) instead",
}


def lookup(model) -> tuple[Architecture | None, str | None]:
    """(architecture, None) when padfree serves `model` (a transformers PreTrainedModel), else (None, why)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in UNSUPPORTED:
        return None, f"model type {model_type!r}: {UNSUPPORTED[model_type]}"
    if model_type not in ARCHITECTURES:
        return None, (f"model type {model_type!r} is not in padfree's architecture table (padfree.hf.models); "
                      f"served: {', '.join(sorted(ARCHITECTURES))}")
    if not type(model)._can_set_attn_implementation():
        return None, (f"{type(model).__name__}'s attention does not go through transformers' "
                      "AttentionInterface, so it cannot be switched to padfree")
    return ARCHITECTURES[model_type], None


_TINY_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
_TINY_IF_PRESENT = dict(head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                        num_experts=4, num_local_experts=4)


def shrink(values: dict) -> dict:
    """A config dict (config.json) with its sizes made tiny; attention options (window, softcap,
    scaling, layer types of the remaining layers) are kept."""
    small = {**values, **{key: TINY[key] for key in _TINY_SIZES}}
    small.update({key: size for key, size in _TINY_IF_PRESENT.items() if key in values})
    if "num_experts_per_tok" in values:
        small["num_experts_per_tok"] = min(values["num_experts_per_tok"], TINY_MOE["num_experts_per_tok"])
    if values.get("layer_types"):
        small["layer_types"] = list(values["layer_types"])[: TINY["num_hidden_layers"]]
    return small
