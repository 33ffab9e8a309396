"""Adapters that switch a transformers / PEFT model instance to padfree (see patch.py).

    multi_adapter, mixture_of_adapters, load_mixture_of_adapters, unpatch_adapters
        several PEFT LoRA adapters on one base in one pass (see adapters.py)
"""

from padfree import _lazy

_LAZY = {name: "padfree.hf.adapters"
         for name in ("multi_adapter", "mixture_of_adapters", "load_mixture_of_adapters", "unpatch_adapters")}

__all__ = list(_LAZY)


__getattr__, __dir__ = _lazy.exports("padfree.hf", globals(), _LAZY)
