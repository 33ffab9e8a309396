"""Varlen attention on the Triton kernels (interpreted on CPU) against the float64 reference.

The kernels run with 16 x 16 tiles here so that short sequences cross many tile edges (lengths
0, 1, 15, 16, 17, ...); one test runs the production tiles. Outputs are NaN-poisoned, so an
element no program writes fails. Gradients flow through the registered custom op and its
autograd, exactly as in training.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import padfree
import padfree.ops.attention  # noqa: F401  (registers torch.ops.padfree.varlen_attention_*)
from padfree.reference import attention as reference
from tests.conftest import cuda_syncs_raise
from tests.numerics import assert_close

kernels = pytest.importorskip("padfree.kernels.attention")

EDGE_LENGTHS_Q = [17, 0, 1, 16, 33, 15]
EDGE_LENGTHS_K = [17, 3, 1, 16, 33, 15]


def packed(lengths_q, lengths_k, heads_q=4, heads_k=2, dim=32, dtype=torch.float32, tail=3):
    cu_q = torch.tensor([0] + list(lengths_q)).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(lengths_k)).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]) + tail, heads_q, dim).to(dtype)
    k = torch.randn(int(cu_k[-1]) + tail, heads_k, dim).to(dtype)
    v = torch.randn(int(cu_k[-1]) + tail, heads_k, dim).to(dtype)
    return q, k, v, cu_q, cu_k


def run_op(q, k, v, cu_q, cu_k, backend, scale, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0, seed=7):
    """Forward + backward through the custom op (as `varlen_attention` calls it) with a known seed."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    max_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    max_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    out, lse = torch.ops.padfree.varlen_attention_fwd(
        q, k, v, cu_q, cu_k, max_q, max_k, scale, window[0], window[1], softcap, alibi, dropout_p,
        torch.tensor(seed, dtype=torch.int64), backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    return out.detach(), lse, dout, q.grad, k.grad, v.grad


def check_against_reference(q, k, v, cu_q, cu_k, scale=0.3, window=(-1, -1), softcap=0.0, alibi=None,
                            dropout_p=0.0, seed=7):
    out, lse, dout, dq, dk, dv = run_op(q, k, v, cu_q, cu_k, "triton", scale, window, softcap, alibi, dropout_p, seed)
    masks = kernels.dropout_keep_mask(seed, cu_q, cu_k, q.shape[1], dropout_p) if dropout_p > 0 else None
    args = (cu_q, cu_k, scale, window[0], window[1], softcap)
    alibi64 = None if alibi is None else alibi.double()
    wide = [t.double() for t in (q, k, v)]
    oracle, oracle_lse = reference.attention(*wide, *args, alibi64, dropout_p, dropout_masks=masks)
    oracle_grads = reference.attention_backward(dout.double(), *wide, *args, alibi64, dropout_p, dropout_masks=masks)
    baseline = baseline_grads = (None, None, None)
    if q.dtype != torch.float32:
        baseline, _ = reference.attention(q, k, v, *args, alibi, dropout_p, dropout_masks=masks, upcast=False)
        baseline_grads = reference.attention_backward(dout, q, k, v, *args, alibi, dropout_p, dropout_masks=masks,
                                                      upcast=False)
    assert_close("out", out, oracle, baseline, factor=2)
    for name, grad, want, base in zip(("dq", "dk", "dv"), (dq, dk, dv), oracle_grads, baseline_grads):
        assert_close(name, grad, want, base, factor=3)
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse must be +inf exactly on rows with no key"
    if finite.any():
        assert (lse[finite].double() - oracle_lse[finite]).abs().max().item() < 1e-4
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    assert (out[total_q:] == 0).all() and (dq[total_q:] == 0).all()
    assert (dk[total_k:] == 0).all() and (dv[total_k:] == 0).all()


@pytest.fixture
def small_tiles(triton_cpu):
    with kernels.override_tiles(16, 16):
        yield


OPTIONS = {
    "plain": dict(),
    "causal": dict(window=(-1, 0)),
    "window": dict(window=(5, 2)),
    "window_left_only": dict(window=(7, -1)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="heads"),
    "alibi_per_sequence": dict(alibi="batch"),
    "dropout": dict(dropout_p=0.3),
    "causal_dropout_softcap": dict(window=(-1, 0), dropout_p=0.2, softcap=3.0),
}


def materialise(opts, heads, batch):
    opts = dict(opts)
    if opts.get("alibi") == "heads":
        opts["alibi"] = torch.rand(heads) * 0.5
    elif opts.get("alibi") == "batch":
        opts["alibi"] = torch.rand(batch, heads) * 0.5
    return opts


FP16_OPTIONS = ("plain", "causal", "softcap", "alibi", "causal_dropout_softcap")


@pytest.mark.parametrize("dtype, name", [pytest.param(torch.float32, name, id=f"fp32-{name}") for name in OPTIONS]
                         + [pytest.param(torch.float16, name, id=f"fp16-{name}") for name in FP16_OPTIONS])
def test_every_option_against_float64(small_tiles, name, dtype):
    q, k, v, cu_q, cu_k = packed(EDGE_LENGTHS_Q, EDGE_LENGTHS_K, dtype=dtype)
    check_against_reference(q, k, v, cu_q, cu_k, **materialise(OPTIONS[name], 4, len(EDGE_LENGTHS_Q)))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_gqa_and_mqa(small_tiles, heads, window):
    q, k, v, cu_q, cu_k = packed([9, 20], [9, 20], heads_q=heads[0], heads_k=heads[1])
    check_against_reference(q, k, v, cu_q, cu_k, window=window)


@pytest.mark.parametrize("head_dim", [16, 80, 96, 128, 192, 256])
def test_head_dims(small_tiles, head_dim):
    q, k, v, cu_q, cu_k = packed([18, 5], [18, 5], heads_q=2, heads_k=1, dim=head_dim, dtype=torch.float16)
    check_against_reference(q, k, v, cu_q, cu_k, scale=head_dim ** -0.5, window=(-1, 0))


@pytest.mark.parametrize("window", [(-1, 0), (3, 0), (-1, -1)], ids=["causal", "sliding", "full"])
def test_causal_is_bottom_right_when_lengths_differ(small_tiles, window):
    # sq > sk leaves the first sq - sk queries with no key under causal: out 0, grads 0, lse +inf.
    q, k, v, cu_q, cu_k = packed([20, 5, 7], [6, 19, 7])
    check_against_reference(q, k, v, cu_q, cu_k, window=window)


def test_production_tiles(triton_cpu):
    q, k, v, cu_q, cu_k = packed([130, 1, 127], [130, 1, 127], heads_q=2, heads_k=1, dim=64, dtype=torch.float16)
    check_against_reference(q, k, v, cu_q, cu_k, scale=0.125, window=(-1, 0))


@pytest.mark.parametrize("kind, index", [(kind, i) for kind, count in (("fwd", 4), ("dkdv", 1), ("dq", 2))
                                         for i in range(count)])
def test_every_tuning_candidate_at_head_dim_128(triton_cpu, kind, index):
    """On a GPU the head-dim-128 tiles are picked by timing; each candidate must be right."""
    from padfree.kernels import attention as kernels
    from padfree.kernels import runtime

    choices = kernels.TILES.choices(kernels.tile_key(kind, 128, torch.float16))
    assert len(choices) == {"fwd": 4, "dkdv": 1, "dq": 2}[kind]
    q, k, v, cu_q, cu_k = packed([130, 1, 70], [130, 1, 70], heads_q=2, heads_k=1, dim=128, dtype=torch.float16)
    with runtime.force_choice(f"attention_{kind}", index):
        check_against_reference(q, k, v, cu_q, cu_k, window=(-1, 0))


def test_tile_defaults_per_arch():
    """sm_90 starts from its own tiles; a tile registered for sm_90 only is never offered to sm_80;
    without a GPU (arch None) every tile is a candidate, so the interpreter tests cover them all."""
    from padfree.kernels import attention as kernels
    from padfree.kernels import registry

    def shapes(kind, pad, arch):
        tiles = kernels.TILES.choices(kernels.tile_key(kind, pad, torch.bfloat16), arch)
        return [(t.block_m, t.block_n, t.num_warps) for t in tiles]

    assert shapes("fwd", 128, 90)[0] == (128, 128, 8) and shapes("fwd", 128, 80)[0] == (128, 64, 8)
    assert (128, 128, 8) not in shapes("fwd", 128, 80)
    # head dim 256: Hopper runs 128-row tiles on 8 warps, sm_80 the base tiles, sm_86/89 a forward
    # and dq that fit 99 KB of shared memory; dk/dv runs in two passes on all of them
    assert [shapes(kind, 256, 90) for kind in ("fwd", "dq", "dkdv")] == [[(128, 16, 8)], [(128, 16, 8)],
                                                                        [(16, 128, 8)]]
    assert [shapes(kind, 256, 80) for kind in ("fwd", "dq", "dkdv")] == [[(64, 64, 8)], [(64, 64, 8)], [(64, 16, 8)]]
    assert [shapes(kind, 256, 86) for kind in ("fwd", "dq", "dkdv")] == [[(32, 32, 4)], [(32, 32, 4)], [(64, 16, 8)]]
    assert [t.passes for arch in (80, 86, 89, 90)
            for t in kernels.TILES.choices(kernels.tile_key("dkdv", 256, torch.bfloat16), arch)] == [2, 2, 2, 2]
    assert set(shapes("fwd", 128, None)) == set(shapes("fwd", 128, 90))
    entry = next(e for e in registry.all_kernels() if e.name.endswith(".attention_fwd_kernel"))
    archs = {launch.archs for launch in entry.launches() if " d128 128x128 " in launch.label}
    assert archs == {(90,)}


@pytest.mark.parametrize("index", range(3))
def test_every_tile_at_head_dim_256(triton_cpu, index):
    """Head dim 256 has its own tiles on each arch (sm_80: the base ones; sm_90: 128-row tiles;
    sm_86/89: forward and dq tiles that fit 99 KB of shared memory; dk/dv in two passes on both
    sm_80 and sm_90): every kernel must be right with each (arch None lists all of them)."""
    from padfree.kernels import attention as kernels
    from padfree.kernels import runtime

    counts = {kind: len(kernels.TILES.choices(kernels.tile_key(kind, 256, torch.float16)))
              for kind in ("fwd", "dkdv", "dq")}
    assert counts == {"fwd": 3, "dkdv": 2, "dq": 3}
    q, k, v, cu_q, cu_k = packed([70, 1, 33], [70, 1, 33], heads_q=2, heads_k=1, dim=256, dtype=torch.float16)
    with runtime.force_choice("attention_fwd", index), runtime.force_choice("attention_dkdv", min(index, 1)), \
            runtime.force_choice("attention_dq", index):
        check_against_reference(q, k, v, cu_q, cu_k, window=(-1, 0))


class _DkdvOutputs:
    """Stands in for the dk/dv kernel: records the OUTPUT of every launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.outputs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.outputs.append(kwargs["OUTPUT"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("name", ["plain", "causal", "window", "alibi", "causal_dropout_softcap"])
def test_dk_and_dv_in_two_passes(triton_cpu, monkeypatch, name):
    """A two-pass tile (head dim 256 on sm_90) launches the dk/dv kernel for dv, then for dk; with
    every option, GQA, edge lengths and tail rows, the two launches together give dk and dv."""
    spy = _DkdvOutputs(kernels.attention_bwd_dkdv_kernel)
    monkeypatch.setattr(kernels, "attention_bwd_dkdv_kernel", spy)
    q, k, v, cu_q, cu_k = packed(EDGE_LENGTHS_Q, EDGE_LENGTHS_K)
    with kernels.override_tiles(16, 16, passes=2):
        check_against_reference(q, k, v, cu_q, cu_k, **materialise(OPTIONS[name], 4, len(EDGE_LENGTHS_Q)))
    assert spy.outputs == ["dv", "dk"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=5),
       causal=st.booleans(), tail=st.integers(0, 5))
def test_random_cu_seqlens(small_tiles, lengths, causal, tail):
    lengths_q, lengths_k = zip(*lengths)
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, heads_q=2, heads_k=1, dim=16, tail=tail)
    check_against_reference(q, k, v, cu_q, cu_k, window=(-1, 0) if causal else (-1, -1))


def test_position_ids_offsets_launch_programs_for_the_work_not_one_per_token(small_tiles, monkeypatch):
    """`cu_seqlens_from_position_ids` returns numel + 1 offsets (the sequence count stays on the
    device), so the block table has a slot per token. The grids must follow the work: at most
    2 ceil(total / block) + SPARE_PROGRAMS programs (lowered to 1 here, so that these few tokens
    need fewer programs than entries with work and the programs take several rounds), and the
    result still matches the reference."""
    monkeypatch.setattr(kernels, "SPARE_PROGRAMS", 1)
    from padfree.reference.seqlens import cu_seqlens_from_position_ids

    lengths = [1, 3, 20, 2, 9, 1, 5, 2, 1, 4, 1, 3]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu, _ = cu_seqlens_from_position_ids(position_ids)
    total = sum(lengths)
    assert cu.numel() == total + 1
    grids = []
    for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, type("Spy", (), {
            "__getitem__": lambda self, grid, kernel=kernel, name=name: grids.append((name, grid)) or kernel[grid]})())
    q, k, v = (torch.randn(total, heads, 16) for heads in (2, 1, 1))
    check_against_reference(q, k, v, cu, cu, window=(-1, 0))
    assert sorted(name for name, _ in grids) == ["attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
                                                 "attention_fwd_kernel"]
    with_work = sum(-(-n // 16) for n in lengths)
    for name, grid in grids:
        assert grid[0] == 2 * -(-total // 16) + 1 < with_work, (name, grid)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_reproducible():
    """No atomics (tests/kernels/test_jit_specialization.py checks the compiled code), so two
    backward passes with the same dropout seed give the same bits."""
    lengths = [1000, 3, 2048, 517]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    q = torch.randn(int(cu[-1]), 16, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :4]), torch.randn_like(q[:, :4])
    dout = torch.randn_like(q)
    seed = torch.tensor(123, device="cuda")
    args = (cu, cu, 2048, 128 ** -0.5, -1, 0, 0.0, None, 0.1)
    out, lse = kernels.forward(q, k, v, *args, seed)
    first = kernels.backward(dout, q, k, v, out, lse, *args, seed)
    second = kernels.backward(dout, q, k, v, out, lse, *args, seed)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dropout_mask_rate_and_seed(triton_cpu):
    cu = torch.tensor([0, 64, 128], dtype=torch.int32)
    first = kernels.dropout_keep_mask(5, cu, cu, 4, 0.25)
    again = kernels.dropout_keep_mask(5, cu, cu, 4, 0.25)
    other = kernels.dropout_keep_mask(6, cu, cu, 4, 0.25)
    kept = torch.cat([m.flatten() for m in first]).float().mean().item()
    assert abs(kept - 0.75) < 0.02
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], first[1])


def test_public_api_matches_reference_backend(triton_cpu):
    q, k, v, cu_q, cu_k = packed([12, 7], [12, 7], heads_q=4, heads_k=2)
    got, lse = padfree.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, causal=True, return_lse=True)
    with padfree.use_backend("reference"):
        want, want_lse = padfree.varlen_attention(q, k, v, cu_q, cu_k, 12, 12, causal=True, return_lse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(triton_cpu, backend):
    q, k, v, cu_q, cu_k = packed([6, 3], [6, 3], heads_q=2, heads_k=1, dim=16, tail=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    seed = torch.tensor(3, dtype=torch.int64)
    args = (q, k, v, cu_q, cu_k, 6, 6, 0.25, -1, 0, 0.0, None, 0.0, seed, backend)
    torch.library.opcheck(torch.ops.padfree.varlen_attention_fwd, args)
    out, lse = torch.ops.padfree.varlen_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 6, 6,
                0.25, -1, 0, 0.0, None, 0.0, seed, backend)
    torch.library.opcheck(torch.ops.padfree.varlen_attention_bwd, bwd_args)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_torch_compile_fullgraph_forward_and_backward(triton_cpu, monkeypatch, dropout_p):
    """One graph with the Triton kernels inside (counted), against eager: without dropout the
    float64 reference, with dropout the eager op from the same generator state (the seed is drawn
    inside the graph, on the inputs' device)."""
    q, k, v, cu_q, cu_k = packed([9, 4], [9, 4], heads_q=4, heads_k=2, dim=16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    launches = []
    forward, backward = kernels.forward, kernels.backward
    monkeypatch.setattr(kernels, "forward", lambda *args, **kw: launches.append("fwd") or forward(*args, **kw))
    monkeypatch.setattr(kernels, "backward", lambda *args, **kw: launches.append("bwd") or backward(*args, **kw))

    def step(q, k, v, cu_q, cu_k):
        return padfree.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=True, dropout_p=dropout_p).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    loss = compiled(q, k, v, cu_q, cu_k)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert launches == ["fwd", "bwd"]
    if dropout_p:
        torch.manual_seed(5)
        want_loss = step(q, k, v, cu_q, cu_k)
        want = torch.autograd.grad(want_loss, (q, k, v))
        assert torch.equal(loss, want_loss) and all(torch.equal(a, b) for a, b in zip(grads, want))
        return
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_loss = reference.attention(*wide, cu_q, cu_k, 16 ** -0.5, -1, 0)[0].square().sum()
    want = torch.autograd.grad(want_loss, wide)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def bad(**changes):
    q, k, v, cu_q, cu_k = packed([4, 5], [4, 5], heads_q=4, heads_k=2, dim=16, tail=0)
    call = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)
    call.update(changes)
    return call


@pytest.mark.parametrize("changes, error, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9])), TypeError, "int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
    (dict(k=torch.randn(9, 3, 16), v=torch.randn(9, 3, 16)), ValueError, "multiple"),
    (dict(q=torch.randn(9, 4, 16, dtype=torch.float64)), TypeError, "q"),
    (dict(q=torch.randn(9, 4, 300), k=torch.randn(9, 2, 300), v=torch.randn(9, 2, 300)), ValueError, "head_dim"),
    (dict(v=torch.randn(8, 2, 16)), ValueError, "same tokens and heads"),
    (dict(q=torch.randn(9, 16)), ValueError, "q"),
    (dict(q=torch.randn(9, 4, 16, device="meta")), ValueError, "device"),
])
def test_bad_input_raises_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        padfree.varlen_attention(**bad(**changes))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="window_size"):
        padfree.varlen_attention(**bad(), window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        padfree.varlen_attention(**bad(), dropout_p=1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        padfree.varlen_attention(**bad(), alibi_slopes=torch.rand(3))


def entries(table):
    """The (2, G) (sequence, block) rows of a block table, without its trailing count."""
    return table[:-1].view(2, -1)


@pytest.mark.parametrize("order, expected", [
    ("length", [(2, 0), (2, 1), (1, 0), (3, 0)]),          # L = 32, 32, 5, 1
    ("causal_queries", [(2, 1), (2, 0), (1, 0), (3, 0)]),  # keys seen: 32, 16, 5, 1
    ("causal_keys", [(2, 0), (2, 1), (1, 0), (3, 0)]),     # queries served: 32, 16, 5, 1
])
def test_block_table_covers_every_block_once_heaviest_first(order, expected):
    # sequences of 0, 5, 32 and 1 tokens, then a tail of 7 padding tokens (45 in all)
    cu = torch.tensor([0, 0, 5, 37, 38], dtype=torch.int32)
    table = kernels.block_table(cu, 45, 16, order)
    seq, index = entries(table).tolist()
    assert list(zip(seq, index))[:5] == [*expected, (4, 0)]    # the tail after the real blocks
    assert all(s == 5 for s in seq[5:])                         # then the entries with nothing to do
    assert len(seq) == -(-45 // 16) + 4 + 1
    assert table[-1] == 5                                       # the entries with work


def test_block_tables_of_every_order_hold_the_same_blocks():
    lengths = [0, 300, 17, 1, 128, 129, 64]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    total = int(cu[-1]) + 5
    tables = [kernels._build_block_table(cu, total, 64, order) for order in kernels.TABLE_ORDERS]
    pairs = [sorted(map(tuple, entries(table).t().tolist())) for table in tables]
    assert pairs[0] == pairs[1] == pairs[2]
    with pytest.raises(ValueError, match="order must be one of"):
        kernels._build_block_table(cu, total, 64, "random")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_real_sizes(causal):
    lengths = [1000, 3, 4096, 517, 2048, 129]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    total = int(cu[-1])
    q = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16)
    with cuda_syncs_raise():
        out = padfree.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    window = (-1, 0) if causal else (-1, -1)
    wide = [t.detach().double() for t in (q, k, v)]
    oracle, _ = reference.attention(*wide, cu, cu, 128 ** -0.5, *window)
    baseline, _ = reference.attention(q.detach(), k.detach(), v.detach(), cu, cu, 128 ** -0.5, *window, upcast=False)
    assert_close("out", out, oracle, baseline, factor=2)
    oracle_grads = reference.attention_backward(dout.double(), *wide, cu, cu, 128 ** -0.5, *window)
    baseline_grads = reference.attention_backward(dout, q.detach(), k.detach(), v.detach(), cu, cu, 128 ** -0.5,
                                                  *window, upcast=False)
    for name, got, want, base in zip(("dq", "dk", "dv"), grads, oracle_grads, baseline_grads):
        assert_close(name, got, want, base, factor=3)


@pytest.mark.gpu
def test_gpu_no_recompile_across_batches_and_max_seqlen():
    """Token, block and sequence counts change every batch (1, multiples of 16, others) and so may
    max_seqlen: the JIT caches of the kernels must not grow after the first batch."""
    def compiled_variants():
        return sum(len(cache[0]) for kernel in (kernels.attention_fwd_kernel, kernels.attention_bwd_delta_kernel,
                                                kernels.attention_bwd_dkdv_kernel, kernels.attention_bwd_dq_kernel)
                   for cache in kernel.device_caches.values())

    def batch(lengths, max_seqlen):
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(int(cu[-1]), 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(int(cu[-1]), 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        out = padfree.varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
        out.sum().backward()

    batch([100, 200], 200)
    before = compiled_variants()
    for lengths, max_seqlen in (([1], 1), ([16, 16], 4096), ([17, 5, 300], 300), ([64] * 8, 1000)):
        batch(lengths, max_seqlen)
    assert compiled_variants() == before


def test_block_table_is_built_once_per_offsets_and_rebuilt_after_an_in_place_update():
    cu = torch.tensor([0, 5, 37], dtype=torch.int32)
    first = kernels.block_table(cu, 40, 16)
    assert kernels.block_table(cu, 40, 16) is first
    assert kernels.block_table(cu, 40, 16, "causal_queries") is not first
    cu[1] = 20
    rebuilt = kernels.block_table(cu, 40, 16)
    assert rebuilt is not first
    assert torch.equal(rebuilt, kernels._build_block_table(cu.clone(), 40, 16))
    with torch.inference_mode():
        frozen = torch.tensor([0, 5, 37], dtype=torch.int32)
        assert torch.equal(kernels.block_table(frozen, 40, 16), kernels._build_block_table(frozen, 40, 16))
