"""`patch_moe`: serve a transformers-5 model's experts with `padfree.moe_experts`.

transformers 5 stores experts as fused 3-D weights and dispatches their forward through
`ExpertsInterface`, keyed by `config._experts_implementation`. padfree registers "padfree" there
(transformers' own registry; nothing uses the name until a model is switched to it) and switches
this model instance with `model.set_experts_implementation("padfree")`, keeping the previous
value for `unpatch`. Other model instances keep their own config and are not affected.

Served: gated experts in the default layout (gate_up_proj (E, 2I, H) = [gate; up], down_proj
(E, H, I)), no bias, SiLU, the default gate — Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE,
DeepSeek-V3 and others built with `@use_experts_implementation`. Experts in another layout
(GPT-OSS: transposed, interleaved gate/up, biases, clamped SwiGLU) or under expert parallelism
are reported as not served; at run time they keep transformers' `grouped_mm` path.

Routers whose math `padfree.moe_route` reproduces (ROUTERS below: softmax -> top-k -> optional
renormalise, GraniteMoE's softmax over the top-k logits, which is the same thing, and
DeepSeek-V3's sigmoid + correction bias + group-limited top-k + scaling) get their instance's
`forward` replaced by one that computes the same logits and routes with the fused kernel.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from padfree.hf.attention import find_transformers_model
from padfree.hf.patch import PatchReport

NAME = "padfree"
SILU_NAMES = ("silu", "swish")


def _experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules built with transformers' `@use_experts_implementation` (they carry `has_gate`)."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "down_proj")]


def unserved_reason(module: torch.nn.Module) -> str | None:
    """Why padfree cannot run this experts module, None when it can."""
    from transformers.integrations import moe as hf_moe

    if not module.has_gate:
        return "experts without a gate projection"
    if module.is_transposed or not getattr(module, "is_concatenated", True):
        return "transposed or interleaved gate/up weights (e.g. GPT-OSS)"
    if module.has_bias:
        return "expert biases"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert"
    if type(module)._apply_gate is not hf_moe._default_apply_gate:
        return f"a custom gate ({type(module).__name__}._apply_gate, e.g. clamped SwiGLU)"
    activation = getattr(getattr(module, "config", None), "hidden_act", None)
    if activation not in SILU_NAMES:
        return f"activation {activation!r} (padfree fuses SiLU)"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism"
    return None


def padfree_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` function: padfree's grouped experts, transformers' grouped_mm otherwise."""
    from padfree.ops.moe import moe_experts
    from transformers.integrations import moe as hf_moe

    if unserved_reason(self) is not None:
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    weight_dtype = self.gate_up_proj.dtype
    # The indices come from the model's own router: skip the range check's device->host copy.
    out = moe_experts(hidden_states.to(weight_dtype), top_k_index, top_k_weights, self.gate_up_proj,
                      self.down_proj, check=False)
    return out.to(hidden_states.dtype)


def patch_moe(model: torch.nn.Module, report: PatchReport, undo: list) -> None:
    """Switch `model`'s experts to padfree through `ExpertsInterface` (see the module docstring)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        report.add("moe", "", False, "this transformers version has no ExpertsInterface (needs transformers >= 5)")
        return
    modules = _experts_modules(model)
    if not modules:
        report.add("moe", "", False, "no experts module dispatching through transformers' ExpertsInterface")
        return
    target = find_transformers_model(model)
    if target is None or not hasattr(target, "set_experts_implementation"):
        report.add("moe", "", False, "the model has no set_experts_implementation (not a transformers "
                                     "PreTrainedModel of a version with ExpertsInterface)")
        return
    ALL_EXPERTS_FUNCTIONS.register(NAME, padfree_experts_forward)
    previous = target.get_experts_implementation()
    target.set_experts_implementation(NAME)
    undo.append(lambda: target.set_experts_implementation(previous))
    _patch_routers(model, report, undo)
    for name, module in modules:
        reason = unserved_reason(module)
        if reason is None:
            report.add("moe", name, True, "padfree grouped experts (moe_experts) via ExpertsInterface")
        else:
            report.add("moe", name, False, f"not served: {reason}; runs transformers' grouped_mm")


@dataclass(frozen=True)
class RouterSpec:
    scoring: str
    fp32_logits: str           # "inputs": linear on fp32 inputs (DeepSeek-V3); "output": cast after (GraniteMoE)
    weights_dtype: str         # "fp32" | "logits" | "hidden": the dtype the router returns its weights in
    normalize_attr: str | None  # attribute holding norm_topk_prob; None: always normalise
    deepseek: bool = False     # correction bias, groups and scaling from the router's attributes


ROUTERS = {
    "MixtralTopKRouter": RouterSpec("softmax", "", "fp32", None),
    "Qwen2MoeTopKRouter": RouterSpec("softmax", "", "logits", "norm_topk_prob"),
    "Qwen3MoeTopKRouter": RouterSpec("softmax", "", "logits", "norm_topk_prob"),
    "OlmoeTopKRouter": RouterSpec("softmax", "", "logits", "norm_topk_prob"),
    "GraniteMoeTopKRouter": RouterSpec("softmax", "output", "hidden", None),
    "DeepseekV3TopkRouter": RouterSpec("sigmoid", "inputs", "fp32", "norm_topk_prob", deepseek=True),
}


def _routed_forward(self, hidden_states: torch.Tensor):
    """Router forward: the model's logits, then `padfree.moe_route` -> (logits, weights, index)."""
    from padfree.ops.moe import moe_route

    spec = ROUTERS[type(self).__name__]
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    if spec.fp32_logits == "inputs":
        router_logits = torch.nn.functional.linear(hidden_states.float(), self.weight.float())
    else:
        router_logits = torch.nn.functional.linear(hidden_states, self.weight)
    if spec.fp32_logits == "output":
        router_logits = router_logits.float()
    normalize = True if spec.normalize_attr is None else bool(getattr(self, spec.normalize_attr))
    options = {}
    if spec.deepseek:
        options = dict(correction_bias=self.e_score_correction_bias, n_group=self.num_group,
                       topk_group=self.topk_group, routed_scaling_factor=float(self.routed_scaling_factor))
    weights, index = moe_route(router_logits, self.top_k, spec.scoring, normalize, **options)
    if spec.weights_dtype == "logits":
        weights = weights.to(router_logits.dtype)
    elif spec.weights_dtype == "hidden":
        weights = weights.to(hidden_states.dtype)
    return router_logits, weights, index


def _patch_routers(model: torch.nn.Module, report: PatchReport, undo: list) -> None:
    for name, module in model.named_modules():
        class_name = type(module).__name__
        if not class_name.endswith(("Router", "TopkRouter")):
            continue
        if class_name not in ROUTERS:
            report.add("moe", name, False, f"router {class_name}: no moe_route equivalent; runs its own forward")
            continue
        own = vars(module).get("forward")
        module.forward = types.MethodType(_routed_forward, module)
        undo.append(lambda module=module, own=own: _restore_forward(module, own))
        report.add("moe", name, True, f"router: padfree.moe_route ({ROUTERS[class_name].scoring})")


def _restore_forward(module: torch.nn.Module, own) -> None:
    if own is None:
        del module.forward
    else:
        module.forward = own
