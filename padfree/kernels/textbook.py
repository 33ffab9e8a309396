"""Plain Triton kernels of textbook structure: the yardstick of `padfree.efficiency`.

A GEMM and a FlashAttention-2 forward and backward (one head, one sequence whose length is a
multiple of the tiles, no masks, no varlen block table, no dropout), written as the algorithm
is usually stated. They are never launched by padfree's ops; `padfree compile-check --efficiency`
compiles them at the tile of every hot kernel, so that the main-loop instruction count of a padfree
kernel is compared with the count the same tile costs in a kernel that does nothing else.
(The tests run them in the interpreter against float64, so the yardstick computes what it claims.)

GEMM: c = a @ b^T with a (M, K) and b (N, K) row-major (the nn.Linear layout: y = x W^T).
With DROPOUT, c = (a * keep) @ b^T with keep the stream-0 mask of padfree's LoRA dropout
(`lora.dropout_keep`, the same hash and bit split): the yardstick of the LoRA kernels that drop
out their operand in the main loop (shrink with dropout, dA), whose random bits are work a plain
GEMM does not do.

Attention, scores s = scale q k^T, base-2 softmax with log2(e) folded into the scale:

    forward   m' = max(m, rowmax s), l' = l 2^(m - m') + rowsum 2^(s - m'), acc' = acc 2^(m - m') + 2^(s - m') V
              out = acc / l, lse = (m + log2 l) ln 2      (m in the base-2 domain)
    backward  P = exp(s - lse), D_i = sum_d dO_id O_id, dV = P^T dO, dP = dO V^T, dS = P (dP - D),
              dQ = scale dS K, dK = scale dS^T Q
"""

from __future__ import annotations

import triton
import triton.language as tl

from padfree.kernels import registry
from padfree.kernels.lora import dropout_keep

LOG2E = 1.4426950408889634


@triton.jit
def textbook_gemm_kernel(a_ptr, b_ptr, c_ptr, seed_ptr, M, N, K, stride_am, stride_bn, stride_cm, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of c = a @ b^T per program; M, N, K multiples of the tiles. DROPOUT:
    each a tile dropped out first (kept where its 16 mask bits >= threshold; seed read from seed_ptr)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None] * stride_am + ks[None, :]
    b_tile = b_ptr + cols[None, :] * stride_bn + ks[:, None]
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_tile)
        if DROPOUT:
            a = tl.where(dropout_keep(seed, 0, rows.to(tl.int64), k0, (K + 1) // 2, threshold, BLOCK_K), a, 0.0)
        acc = tl.dot(a, tl.load(b_tile), acc)
        a_tile += BLOCK_K
        b_tile += BLOCK_K
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def textbook_attention_fwd_kernel(Q, K, V, Out, Lse, stride_t, stride_h, seqlen, softmax_scale,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (query block, head): out and lse of BLOCK_M queries over all `seqlen` keys.
    Tensors are (seqlen, heads, HEAD_DIM) with the head dim contiguous; lse is (heads, seqlen)."""
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = head * stride_h
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :])
    qk_scale = softmax_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        rows = start_n + offs_n
        k = tl.load(K + base + rows[:, None] * stride_t + offs_d[None, :])
        v = tl.load(V + base + rows[:, None] * stride_t + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(Out + base + offs_m[:, None] * stride_t + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty))
    tl.store(Lse + head * seqlen + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


@triton.jit
def textbook_attention_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, stride_t, stride_h, seqlen, softmax_scale,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                                   OUTPUT: tl.constexpr):
    """Program (key block, head): dk and dv of BLOCK_N keys, streaming BLOCK_M queries at a time.
    Works on the transposed scores (keys x queries) so that k and v stay the left operands.
    OUTPUT "dkdv" computes both; "dv" or "dk" only that one (the yardstick of padfree's two-pass
    dk/dv tiles)."""
    head = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = head * stride_h
    k = tl.load(K + base + offs_n[:, None] * stride_t + offs_d[None, :])
    v = tl.load(V + base + offs_n[:, None] * stride_t + offs_d[None, :])
    qk_scale = softmax_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + offs_m
        q = tl.load(Q + base + rows[:, None] * stride_t + offs_d[None, :])
        do = tl.load(DOut + base + rows[:, None] * stride_t + offs_d[None, :])
        lse = tl.load(Lse + head * seqlen + rows)
        if OUTPUT != "dv":
            delta = tl.load(Delta + head * seqlen + rows)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - (lse * 1.4426950408889634)[None, :])
        if OUTPUT != "dk":
            dv += tl.dot(p_t.to(do.dtype), do)
        if OUTPUT != "dv":
            ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
    if OUTPUT != "dv":
        tl.store(DK + base + offs_n[:, None] * stride_t + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty))
    if OUTPUT != "dk":
        tl.store(DV + base + offs_n[:, None] * stride_t + offs_d[None, :], dv.to(DV.dtype.element_ty))


@triton.jit
def textbook_attention_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, stride_t, stride_h, seqlen, softmax_scale,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (query block, head): dq of BLOCK_M queries, streaming BLOCK_N keys at a time."""
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = head * stride_h
    q = tl.load(Q + base + offs_m[:, None] * stride_t + offs_d[None, :])
    do = tl.load(DOut + base + offs_m[:, None] * stride_t + offs_d[None, :])
    lse = tl.load(Lse + head * seqlen + offs_m) * 1.4426950408889634
    delta = tl.load(Delta + head * seqlen + offs_m)
    qk_scale = softmax_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        rows = start_n + offs_n
        k = tl.load(K + base + rows[:, None] * stride_t + offs_d[None, :])
        v = tl.load(V + base + rows[:, None] * stride_t + offs_d[None, :])
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + base + offs_m[:, None] * stride_t + offs_d[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty))


# ---- compile-check registry: the yardstick compiles at padfree's tiles (padfree.efficiency), here
# at one representative bf16 tile each, so the plain compile check covers them too.

def gemm_launch(dtype: str, tile: registry.Tile, dropout: bool = False) -> registry.Launch:
    """The Launch of textbook_gemm_kernel at `tile` (BLOCK_M, BLOCK_N, BLOCK_K) for `dtype` data; with
    `dropout`, the dropout GEMM (label suffix " dropout")."""
    signature = registry.signature(textbook_gemm_kernel,
                                   {**{name: f"*{dtype}" for name in ("a_ptr", "b_ptr", "c_ptr")}, "seed_ptr": "*i64"})
    return registry.Launch.of(tile, f"{dtype} {tile.label}{' dropout' if dropout else ''}", signature,
                              {"DROPOUT": dropout}, aligned=("M", "N", "K"), pipelined=True)


def attention_launch(kernel, dtype: str, tile: registry.Tile, head_dim: int, output: str = "dkdv") -> registry.Launch:
    """A Launch of a textbook attention kernel at `tile` (BLOCK_M, BLOCK_N); `output` ("dkdv",
    "dk", "dv") for the dk/dv kernel."""
    data = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out", "DOut", "DK", "DV", "DQ")}
    signature = registry.signature(kernel, {**data, "Lse": "*fp32", "Delta": "*fp32", "softmax_scale": "fp32"})
    constexprs = dict(HEAD_DIM=head_dim)
    label = f"{dtype} d{head_dim} {tile.label}"
    if "OUTPUT" in signature:
        constexprs["OUTPUT"] = output
        label += f" {output} pass" if output != "dkdv" else ""
    return registry.Launch.of(tile, label, signature, constexprs, aligned=("seqlen",), pipelined=True)


registry.register(textbook_gemm_kernel, lambda: [gemm_launch("bf16", registry.Tile(128, 128, 64, 8, 3)),
                                                 gemm_launch("bf16", registry.Tile(64, 64, 64, 4, 3), dropout=True)])
for _kernel, _tile in ((textbook_attention_fwd_kernel, registry.Tile(128, 64, None, 8, 3)),
                       (textbook_attention_dkdv_kernel, registry.Tile(32, 128, None, 8, 2)),
                       (textbook_attention_dq_kernel, registry.Tile(128, 32, None, 8, 2))):
    registry.register(_kernel, lambda kernel=_kernel, tile=_tile: [attention_launch(kernel, "bf16", tile, 128)])
del _kernel, _tile  # not kernels of this module (tests look for *_kernel attributes)
