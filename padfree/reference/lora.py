"""Plain-PyTorch fused-LoRA linear: the CPU implementation and the test oracle.

For projections p = 0..P-1 that read the same input x (M, K) (P = 1 for a single LoRA linear):

    xa      = dropout(x) @ A_cat^T / (1 - dropout_p)       (M, R),  A_cat = cat(A_p) (R, K)
    y_p     = x @ W_p^T + bias_p + scaling_p * xa_p @ B_p^T   xa_p = xa[:, start_p:end_p]
    dropout(x)_p = x * keep_p                              keep_p = keep(seed, p, row, col)

Projection p's columns of xa use its own mask stream p, so the projections of a shared group are
dropped out independently, as PEFT does with one dropout module per layer.

The mask is a counter-based integer hash of (seed, stream, row, column pair), computed here with
int64 tensor arithmetic and in the Triton kernels with uint32 arithmetic; the two are bit-identical,
so the reference and the kernels drop the same elements and tests compare them directly. The
mask is regenerated in backward from the seed, never saved.

Backward, given dy_p = dL/dy_p and t = [scaling_p * dy_p @ B_p]_p (M, R) (see ops/lora.py):

    dx     = sum_p dy_p @ W_p + sum_p keep_p * (t_p @ A_p) / (1 - dropout_p)
    dA_cat = [t_p^T @ (x * keep_p)]_p / (1 - dropout_p)                  (R, K)
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MIX_1 = 0x21F0AAAD
_MIX_2 = 0x735A2D97
_STREAM_STEP = 0x9E3779B9
_HIGH_STEP = 0x85EBCA6B
# an element owns 16 bits of its column pair's 32-bit hash and is kept when they, as an integer,
# reach this many 2^-16 steps
KEEP_BITS = 16


def keep_threshold(dropout_p: float) -> int:
    """Integer threshold on an element's 16 hash bits: the element is kept when they are >= it."""
    return int(round(dropout_p * (1 << KEEP_BITS)))


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xor-shift-multiply) on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * _MIX_1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MIX_2) & _MASK32
    return h ^ (h >> 15)


def stream_key(seed: int, stream: int) -> int:
    """The per-(seed, stream) key of the hash, a uint32 (as the kernels compute it)."""
    base = torch.tensor((int(seed) + int(stream) * _STREAM_STEP) & _MASK32, dtype=torch.int64)
    return int(_mix32(base))


def stream_seed(seed, stream: int):
    """The seed whose stream 0 is stream `stream` of `seed` (an int or an int64 tensor, as given):
    the hash key depends on seed + stream * 0x9E3779B9 mod 2^32 only (here and in the kernels, which
    take the seed's low 32 bits), so keep_mask(stream_seed(seed, p), 0, ...) == keep_mask(seed, p, ...).
    A kernel with one fixed stream thereby draws any stream's mask."""
    return seed + stream * _STREAM_STEP if stream else seed


def keep_mask(seed: int, stream: int, rows: int, cols: int, dropout_p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (rows, cols) keep-mask of dropout stream `stream` for a row-major (rows, cols) input.

    Columns 2j and 2j + 1 of row m share the hash of pair c = m * ceil(cols / 2) + j (int64):
    h = mix32(lo32(c) ^ key ^ (hi32(c) * 0x85EBCA6B)) with key = mix32(seed + stream * 0x9E3779B9).
    The even column takes h & 0xFFFF, the odd one h >> 16, and an element is kept when its 16 bits
    are >= round(dropout_p * 2^16): a keep probability within 2^-17 of 1 - dropout_p, with one
    hash for two elements (the kernels' mask is most of the shrink's and dA's work).
    """
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    col = torch.arange(cols, dtype=torch.int64, device=device)[None, :]
    pairs = row * ((cols + 1) // 2) + col // 2
    h = _mix32((pairs & _MASK32) ^ stream_key(seed, stream) ^ (((pairs >> 32) * _HIGH_STEP) & _MASK32))
    bits = torch.where(col % 2 == 1, h >> KEEP_BITS, h & ((1 << KEEP_BITS) - 1))
    return bits >= keep_threshold(dropout_p)


def _stream_bounds(rank_ends: list[int]) -> list[tuple[int, int]]:
    starts = [0, *rank_ends[:-1]]
    return list(zip(starts, rank_ends))


def _dropped(x: torch.Tensor, seed: int, stream: int, dropout_p: float) -> torch.Tensor:
    """x * keep_stream (without the 1 / (1 - p) factor)."""
    keep = keep_mask(seed, stream, x.shape[0], x.shape[1], dropout_p, x.device)
    return x * keep.to(x.dtype)


def shrink(x: torch.Tensor, a_cat: torch.Tensor, rank_ends: list[int], dropout_p: float,
           seed: int) -> torch.Tensor:
    """xa = dropout(x) @ A_cat^T, (M, R) in x's dtype, projection p's columns from mask stream p."""
    if dropout_p == 0.0:
        return x @ a_cat.t()
    parts = [_dropped(x, seed, stream, dropout_p) @ a_cat[start:end].t()
             for stream, (start, end) in enumerate(_stream_bounds(rank_ends))]
    return torch.cat(parts, dim=1) / (1.0 - dropout_p)


def forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
            a_cat: torch.Tensor, lora_bs: list[torch.Tensor], rank_ends: list[int], scalings: list[float],
            dropout_p: float, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> ([y_p (M, N_p)], xa (M, R)) for 2-D x (M, K)."""
    xa = shrink(x, a_cat, rank_ends, dropout_p, seed)
    outputs = []
    for (start, end), weight, bias, lora_b, scaling in zip(_stream_bounds(rank_ends), weights, biases,
                                                           lora_bs, scalings):
        y = x @ weight.t() + scaling * (xa[:, start:end] @ lora_b.t())
        if bias is not None:
            y = y + bias
        outputs.append(y)
    return outputs, xa


def backward_input_and_a(dys: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                         t: torch.Tensor, a_cat: torch.Tensor, rank_ends: list[int], dropout_p: float,
                         seed: int, input_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx (M, K), dA_cat (R, K)) from the formulas in the module docstring; dx is an empty
    (0,) tensor when `input_grad` is False (x needs no gradient: its GEMM is skipped)."""
    dx = sum(dy @ weight for dy, weight in zip(dys, weights)) if input_grad else x.new_empty(0)
    if dropout_p == 0.0:
        return (dx + t @ a_cat if input_grad else dx), t.t() @ x
    da_parts = []
    for stream, (start, end) in enumerate(_stream_bounds(rank_ends)):
        keep = keep_mask(seed, stream, x.shape[0], x.shape[1], dropout_p, x.device).to(x.dtype)
        if input_grad:
            dx = dx + keep * (t[:, start:end] @ a_cat[start:end]) / (1.0 - dropout_p)
        da_parts.append(t[:, start:end].t() @ (x * keep))
    return dx, torch.cat(da_parts, dim=0) / (1.0 - dropout_p)
