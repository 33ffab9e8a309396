"""`patch(model)` / `unpatch(model)`: switch one transformers/PEFT model instance to padfree.

Each part lives in its own module and follows one protocol:

    patch_<part>(model, report: PatchReport, undo: list[Callable[[], None]]) -> None

It records every module it considered in `report` (patched, or not and why) and appends to `undo`
the closures that restore exactly what it replaced. Only the given instance changes: no class, no
other model, no global state beyond transformers' own registries (where padfree registers under
the name "padfree", which nothing uses until a model is switched to it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module

import torch

_STATE_ATTR = "_padfree_undo"
_PARTS = (("attention", "padfree.hf.attention", "patch_attention"),
          ("lora", "padfree.hf.lora", "patch_lora"),
          ("moe", "padfree.hf.moe", "patch_moe"))


@dataclass
class PatchRecord:
    part: str      # "attention" | "lora" | "moe"
    module: str    # qualified module name in the model ("" for the whole model)
    patched: bool
    detail: str    # what was done, or why not


@dataclass
class PatchReport:
    """What `patch` did: one record per module considered."""

    records: list[PatchRecord] = field(default_factory=list)

    def add(self, part: str, module: str, patched: bool, detail: str) -> None:
        self.records.append(PatchRecord(part, module, patched, detail))

    def patched(self, part: str | None = None) -> list[PatchRecord]:
        return [r for r in self.records if r.patched and (part is None or r.part == part)]

    def skipped(self, part: str | None = None) -> list[PatchRecord]:
        return [r for r in self.records if not r.patched and (part is None or r.part == part)]

    def summary(self) -> dict[str, tuple[int, int]]:
        """part -> (patched count, not patched count)."""
        parts = dict.fromkeys(r.part for r in self.records)
        return {p: (len(self.patched(p)), len(self.skipped(p))) for p in parts}

    def __str__(self) -> str:
        lines = []
        for part, (done, not_done) in self.summary().items():
            lines.append(f"{part}: {done} patched, {not_done} not patched")
            for record in self.records:
                if record.part == part:
                    mark = "+" if record.patched else "-"
                    lines.append(f"  {mark} {record.module or '<model>'}: {record.detail}")
        return "\n".join(lines) if lines else "nothing to patch"


class NotServedError(ValueError):
    """`patch(strict=True)` could serve nothing of what was asked; the message holds the report."""


def patch(model: torch.nn.Module, attention: bool = True, lora: bool = True, moe: bool = True,
          strict: bool = True) -> PatchReport:
    """Switch `model` (a transformers `PreTrainedModel`, optionally wrapped by PEFT) to padfree.

    attention: packed varlen attention, fed by `cu_seq_lens_*`/`max_length_*` kwargs, packed
        `position_ids` or a 2D padding mask.
    lora: fused LoRA linear for every eligible PEFT LoRA `Linear`.
    moe: padfree experts through transformers' `ExpertsInterface`.
    strict: raise `NotServedError` (a ValueError) when nothing of what was asked could be patched,
        leaving the model as it was. With strict=False the report says why and, when attention was
        asked but refused, the model gets a forward pre-hook that raises on a packed batch
        (`cu_seq_lens_q` or `position_ids` that restart inside a row): its attention would mix
        the packed sequences.

    Returns a `PatchReport` naming what was patched and what was not, and why. Patching a model
    that is already patched first restores it, so calling twice is safe; `unpatch` restores.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        unpatch(model)
    report = PatchReport()
    undo: list[Callable[[], None]] = []
    try:
        for part, module_name, function_name in _PARTS:
            if {"attention": attention, "lora": lora, "moe": moe}[part]:
                getattr(import_module(module_name), function_name)(model, report, undo)
        if strict and report.records and not report.patched():
            raise NotServedError(f"padfree could not patch anything asked of {type(model).__name__} "
                                 f"(pass strict=False to get the report instead):\n{report}")
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    if attention and not report.patched("attention"):
        undo.append(_guard_packed_batches(model, report.skipped("attention")[0].detail))
    object.__setattr__(model, _STATE_ATTR, undo)
    return report


def is_packed_batch(kwargs: dict) -> bool:
    """Whether forward kwargs hold a packed batch: `cu_seq_lens_q`, or `position_ids` that restart
    inside a row (one device->host copy)."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return True
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] != position_ids[..., :-1] + 1).any())


def _guard_packed_batches(model: torch.nn.Module, reason: str) -> Callable[[], None]:
    """A forward pre-hook refusing packed batches on a model whose attention padfree refused."""

    def refuse_packed(module, args, kwargs):
        if is_packed_batch(kwargs):
            raise ValueError(f"a packed batch reached {type(module).__name__}, whose attention padfree did not "
                             f"patch ({reason}): packed sequences would not be computed exactly. "
                             "Feed it padded batches.")

    return model.register_forward_pre_hook(refuse_packed, with_kwargs=True).remove


def run_undo(model: torch.nn.Module, attribute: str) -> None:
    """Run, last first, the restore closures a patch stored on `model` under `attribute`, and drop
    them; nothing when there are none."""
    undo = getattr(model, attribute, None)
    if undo is None:
        return
    for restore in reversed(undo):
        restore()
    object.__delattr__(model, attribute)


def unpatch(model: torch.nn.Module) -> None:
    """Restore everything `patch` changed on `model`; a model that is not patched is left as is."""
    run_undo(model, _STATE_ATTR)


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None
