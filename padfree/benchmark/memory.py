"""Activation memory: the bytes autograd keeps from a forward for its backward, on any device.

Peak memory (`torch.cuda.max_memory_allocated`) needs a GPU. What a training step holds between
forward and backward is the tensors saved for backward, and those can be counted on any device:
`saved_tensors_hooks` sees every tensor an op saves (built-in ops, `autograd.Function`s and
`torch.library` custom ops alike). `SavedTensors` records each saved tensor's storage once,
skipping the storages of tensors that existed before (inputs, weights: a view of them costs
nothing), so the count is the activation memory the forward added. Shapes, not kernels, decide
it: the count on CPU is the count on a GPU for the same shapes and dtypes, and it works under
`FakeTensorMode` (storages are told apart by their C++ object, not their data pointer), so the
activations of a full-size layer can be counted without computing it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """Context manager counting the bytes of the tensors saved for backward inside it.

    >>> w = torch.randn(8, 4, requires_grad=True)
    >>> x = torch.randn(16, 8)
    >>> with SavedTensors(existing=[w, x]) as saved:
    ...     loss = torch.relu(x @ w).sum()      # mm saves x and w (existing), relu its output
    >>> saved.bytes == 16 * 4 * 4
    True
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        self._known = {_storage_key(t) for t in existing}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._known:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())
