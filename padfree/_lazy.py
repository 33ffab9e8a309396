"""Lazy package attributes: a name is imported from its module on first access, so importing the
package loads neither transformers nor triton."""

from __future__ import annotations

from importlib import import_module


def exports(package: str, namespace: dict, lazy: dict[str, str]):
    """(__getattr__, __dir__) for `package`, whose globals are `namespace`, serving the names of
    `lazy` (name -> module); a fetched name is cached in `namespace`."""

    def __getattr__(name):
        if name in lazy:
            value = getattr(import_module(lazy[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(lazy))

    return __getattr__, __dir__
