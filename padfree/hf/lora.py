"""Switch PEFT LoRA `Linear` layers of one model instance to padfree's fused LoRA linear.

`patch_lora(model, report, undo)` (the protocol of padfree/hf/patch.py) replaces the `forward` of
every eligible `peft.tuners.lora.Linear` instance; `undo` puts the original back. A layer is
eligible when its base layer is a plain `torch.nn.Linear` in fp16/bf16/fp32 (not quantized, not
`fan_in_fan_out`), exactly one active adapter has weights in it, that adapter is vanilla LoRA (no DoRA or
other variant), its dropout is `nn.Dropout` or `nn.Identity`, its weights share the base dtype, and
it is not merged. Every other LoRA layer is listed in the report with the reason.

Sibling projections that read the same input (the `SHARED_GROUPS` table: q/k/v of one attention,
gate/up of one MLP) are fused into one `lora_linear_shared` call when all of them are eligible with
the same adapter, dropout p, dtype and in_features: the first member called computes every
member's output in one pass over x and hands the others theirs when they are called with that
same x (same tensor object, unmodified).

The patched forward checks the layer's state on every call and runs PEFT's own forward whenever
the fused op does not apply: adapters merged (PEFT then runs the plain base layer), adapters
disabled, several active adapters, `adapter_names` or extra arguments, an input dtype other than
the weights'. So `merge_adapter` / `unmerge_adapter`, `disable_adapter()` and `save_pretrained`
behave as without padfree.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from padfree.ops import lora as lora_ops

PART = "lora"
# Names of sibling projections inside one parent module that read the same input.
SHARED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _lora_linear_class():
    try:
        from peft.tuners.lora import layer
    except ImportError:
        return None, None
    return layer.Linear, layer.LoraLayer


def _ineligible_reason(module) -> str | None:
    """Why `module` (a PEFT LoRA Linear) cannot use the fused op, or None."""
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return f"base layer is {type(base).__name__}, not torch.nn.Linear (quantized or custom)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (transposed base weight)"
    if base.weight.dtype not in lora_ops.DTYPES:
        return f"base weight dtype {base.weight.dtype} is not fp16/bf16/fp32"
    adapters = _layer_adapters(module)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters {adapters} in this layer; the fused op runs exactly one"
    adapter = adapters[0]
    if adapter in getattr(module, "lora_variant", {}) or module.use_dora.get(adapter, False):
        variant = type(module.lora_variant[adapter]).__name__ if adapter in module.lora_variant else "DoRA"
        return f"adapter {adapter!r} is a LoRA variant ({variant})"
    if module.merged:
        return "adapter is merged into the base weight"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (torch.nn.Dropout, torch.nn.Identity):
        return f"dropout module {type(dropout).__name__} is not nn.Dropout / nn.Identity"
    lora_dtypes = {module.lora_A[adapter].weight.dtype, module.lora_B[adapter].weight.dtype}
    if lora_dtypes != {base.weight.dtype}:
        return f"LoRA weights ({sorted(map(str, lora_dtypes))}) and base weight ({base.weight.dtype}) differ in dtype"
    return None


def _layer_adapters(module) -> list[str]:
    """The active adapters this layer has weights for (PEFT's forward skips the others)."""
    return [a for a in module.active_adapters if a in module.lora_A]


def _dropout_p(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


def _fusable_now(module, x, args, kwargs) -> str | None:
    """The single active adapter when the fused op computes exactly what PEFT's forward would."""
    if args or kwargs or module.disable_adapters or module.merged or not isinstance(x, torch.Tensor):
        return None
    adapters = _layer_adapters(module)
    if len(adapters) != 1 or adapters[0] in module.lora_variant:
        return None
    # Under autocast the op casts x and the weights to the autocast dtype, as PEFT's forward does
    # through F.linear; outside it, a dtype mismatch is PEFT's own casting rule, left to PEFT.
    if not torch.is_autocast_enabled(x.device.type) and (
            x.dtype != module.get_base_layer().weight.dtype or x.dtype != module.lora_A[adapters[0]].weight.dtype):
        return None
    return adapters[0]


def _layer_arguments(module, adapter: str):
    base = module.get_base_layer()
    return (base.weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
            float(module.scaling[adapter]))


def _make_single_forward(module, original: Callable) -> Callable:
    def forward(x, *args, **kwargs):
        adapter = _fusable_now(module, x, args, kwargs)
        if adapter is None:
            return original(x, *args, **kwargs)
        weight, bias, lora_a, lora_b, scaling = _layer_arguments(module, adapter)
        return lora_ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, _dropout_p(module, adapter))

    return forward


class SharedGroup:
    """One shared-input group; holds outputs computed for members not yet called.

    `compute(x)` returns every member's output for input x in one call, or None when the group
    cannot run fused now (its members then run their single forwards). Also used by
    padfree/hf/adapters.py for mixtures of adapters."""

    def __init__(self, compute: Callable[[torch.Tensor], list[torch.Tensor] | None]):
        self.compute = compute
        self.pending_input: weakref.ref | None = None
        self.pending_version = -1
        self.pending: dict[int, torch.Tensor] = {}
        # set when a member was called with another input than the one its output was computed
        # for (the table's guess was wrong for this model, e.g. cross-attention): stop fusing
        self.disabled = False

    def take_pending(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if index not in self.pending or self.pending_input is None:
            return None
        if self.pending_input() is not x or x._version != self.pending_version:
            self.pending.clear()
            self.disabled = True
            return None
        return self.pending.pop(index)

    def compute_all(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        outputs = self.compute(x)
        if outputs is None:
            return None
        self.pending = {i: y for i, y in enumerate(outputs) if i != index}
        self.pending_input = weakref.ref(x)
        self.pending_version = x._version
        return outputs[index]


def _lora_group_outputs(members: list) -> Callable[[torch.Tensor], list[torch.Tensor] | None]:
    def compute(x):
        adapters = [_fusable_now(m, x, (), {}) for m in members]
        if any(a is None for a in adapters) or len(set(adapters)) != 1:
            return None
        dropouts = {_dropout_p(m, a) for m, a in zip(members, adapters)}
        if len(dropouts) != 1:
            return None
        weights, biases, lora_as, lora_bs, scalings = zip(*(_layer_arguments(m, a) for m, a in zip(members, adapters)))
        return lora_ops.lora_linear_shared(x, list(weights), list(biases), list(lora_as), list(lora_bs),
                                           list(scalings), dropouts.pop())

    return compute


def group_forward(group: SharedGroup, index: int, single: Callable) -> Callable:
    """The forward of member `index`: its output computed with the group's, else `single` (its own
    forward, also for calls with extra arguments)."""
    def forward(x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            return single(x, *args, **kwargs)
        ready = group.take_pending(index, x)
        if ready is not None:
            return ready
        fused = None if group.disabled else group.compute_all(index, x)
        return fused if fused is not None else single(x)

    return forward


def _replace_forward(module, forward: Callable, undo: list[Callable[[], None]]) -> None:
    had_instance_forward = "forward" in module.__dict__
    previous = module.__dict__.get("forward")

    def restore():
        if had_instance_forward:
            module.forward = previous
        else:
            del module.forward

    module.forward = forward
    undo.append(restore)


def _group_key(module) -> tuple:
    """Members of a shared group must agree on these (dropout p as configured, not as trained)."""
    adapter = _layer_adapters(module)[0]
    dropout = module.lora_dropout[adapter]
    base = module.get_base_layer()
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    return adapter, p, base.weight.dtype, base.in_features


def find_groups(eligible: dict[str, torch.nn.Module], key: Callable) -> list[list[str]]:
    """Qualified names of eligible siblings forming a SHARED_GROUPS entry whose `key(module)` agree."""
    groups = []
    for parent in sorted({name.rpartition(".")[0] for name in eligible}):
        prefix = f"{parent}." if parent else ""
        for names in SHARED_GROUPS:
            qualified = [prefix + n for n in names]
            if all(q in eligible for q in qualified) and len({key(eligible[q]) for q in qualified}) == 1:
                groups.append(qualified)
    return groups


def patch_lora(model: torch.nn.Module, report, undo: list[Callable[[], None]]) -> None:
    """Replace the forward of every eligible PEFT LoRA Linear of `model` (see the module docstring)."""
    linear_class, layer_class = _lora_linear_class()
    if linear_class is None:
        return
    eligible: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, linear_class):
            reason = _ineligible_reason(module)
            if reason is None:
                eligible[name] = module
            else:
                report.add(PART, name, False, reason)
        elif isinstance(module, layer_class):
            report.add(PART, name, False, f"{type(module).__name__} is not a LoRA Linear layer")
    grouped = set()
    for names in find_groups(eligible, _group_key):
        members = [eligible[n] for n in names]
        group = SharedGroup(_lora_group_outputs(members))
        for index, (name, member) in enumerate(zip(names, members)):
            _replace_forward(member, group_forward(group, index, _make_single_forward(member, member.forward)), undo)
            siblings = ", ".join(n.rpartition(".")[2] for n in names)
            report.add(PART, name, True, f"fused LoRA linear, shared input with {siblings}")
            grouped.add(name)
    for name, module in eligible.items():
        if name not in grouped:
            _replace_forward(module, _make_single_forward(module, module.forward), undo)
            report.add(PART, name, True, "fused LoRA linear")
