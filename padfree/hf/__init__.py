"""Adapters that switch a transformers / PEFT model instance to padfree (see patch.py).

    multi_adapter, mixture_of_adapters, load_mixture_of_adapters, unpatch_adapters
        several PEFT LoRA adapters on one base in one pass (see adapters.py)
"""

from importlib import import_module

_LAZY = {name: "padfree.hf.adapters"
         for name in ("multi_adapter", "mixture_of_adapters", "load_mixture_of_adapters", "unpatch_adapters")}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'padfree.hf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
