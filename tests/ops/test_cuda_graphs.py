"""What CUDA graph capture and replay rely on, checked on the CPU where they can be, then for real
on a GPU (`-m gpu`).

A graph replays the kernels it captured with the arguments they had, so (1) the dropout seed is a
device tensor the kernels read when they run (drawn by the device generator, which a replay
advances), never a host int baked into the launch, and (2) the attention block table is built
inside the capture, not served from the cache on `cu_seqlens`, so a replay after
`static_cu_seqlens.copy_(new)` uses the new boundaries.
"""

import pytest
import torch

import padfree
from padfree.kernels import attention as attention_kernels
from padfree.kernels import lora as lora_kernels
from padfree.reference import attention as reference_attention
from padfree.reference import lora as reference_lora


@pytest.fixture
def small_tiles(triton_cpu):
    with attention_kernels.override_tiles(16, 16):
        yield


def _attention_inputs(lengths=(20, 9), heads=2, dim=16):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), heads, dim) for _ in range(3))
    return q, k, v, cu


def test_attention_kernels_read_the_seed_tensor_when_they_run(small_tiles):
    """Forward and backward launched twice with the same seed tensor, refilled in between (what a
    graph replay does): each run uses the mask of the seed the tensor held at that time."""
    q, k, v, cu = _attention_inputs()
    dout = torch.randn_like(q)
    seed = torch.tensor(5)
    args = (cu, cu, 20, 0.3, -1, -1, 0.0, None, 0.25)
    results = []
    for value in (5, 6):
        seed.fill_(value)
        out, lse = attention_kernels.forward(q, k, v, *args, seed)
        grads = attention_kernels.backward(dout, q, k, v, out, lse, *args, seed)
        results.append((out, *grads))
        masks = attention_kernels.dropout_keep_mask(value, cu, cu, q.shape[1], 0.25)
        wide = [t.double() for t in (q, k, v)]
        want, _ = reference_attention.attention(*wide, cu, cu, 0.3, -1, -1, 0.0, None, 0.25, dropout_masks=masks)
        want_grads = reference_attention.attention_backward(dout.double(), *wide, cu, cu, 0.3, -1, -1, 0.0, None,
                                                            0.25, dropout_masks=masks)
        for got, expected in zip((out, *grads), (want, *want_grads)):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(results[0][0], results[1][0])


def test_lora_kernels_read_the_seed_tensor_when_they_run(triton_cpu):
    x, weight, lora_a, lora_b = torch.randn(40, 24), torch.randn(8, 24), torch.randn(4, 24), torch.randn(8, 4)
    dy, t = torch.randn(40, 8), torch.randn(40, 4)
    seed = torch.tensor(11)
    results = []
    for value in (11, 12):
        seed.fill_(value)
        (y,), xa = lora_kernels.forward(x, [weight], [None], lora_a, [lora_b], [4], [2.0], 0.25, seed)
        dx, da = lora_kernels.backward_input_and_a([dy], x, [weight], t, lora_a, [4], 0.25, seed)
        (want_y,), want_xa = reference_lora.forward(x, [weight], [None], lora_a, [lora_b], [4], [2.0], 0.25, value)
        want_dx, want_da = reference_lora.backward_input_and_a([dy], x, [weight], t, lora_a, [4], 0.25, value)
        for got, expected in ((y, want_y), (xa, want_xa), (dx, want_dx), (da, want_da)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        results.append(xa)
    assert not torch.equal(results[0], results[1])


@pytest.mark.parametrize("op", ["attention", "lora"])
def test_public_ops_draw_the_seed_on_the_input_device_from_its_generator(triton_cpu, monkeypatch, op):
    seeds = []
    if op == "attention":
        q, k, v, cu = _attention_inputs()
        launcher = attention_kernels.forward
        monkeypatch.setattr(attention_kernels, "forward",
                            lambda *args, **kw: seeds.append(args[-1].clone()) or launcher(*args, **kw))

        def call():
            return padfree.varlen_attention(q, k, v, cu, cu, 20, 20, dropout_p=0.25)
    else:
        x, weight, lora_a, lora_b = torch.randn(12, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
        launcher = lora_kernels.forward
        monkeypatch.setattr(lora_kernels, "forward", lambda *args: seeds.append(args[-1].clone()) or launcher(*args))

        def call():
            return padfree.lora_linear(x, weight, None, lora_a, lora_b, 2.0, dropout_p=0.25)

    outputs = []
    for state in (1, 1, 2):
        torch.manual_seed(state)
        outputs.append(call())
    assert len(seeds) == 3 and all(s.dtype == torch.int64 and s.device == torch.device("cpu") for s in seeds)
    torch.manual_seed(1)
    assert int(seeds[0]) == int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    assert torch.equal(seeds[0], seeds[1]) and torch.equal(outputs[0], outputs[1])
    assert not torch.equal(seeds[0], seeds[2]) and not torch.equal(outputs[0], outputs[2])


def test_block_table_is_built_inside_a_capture_not_served_from_the_cache(monkeypatch):
    builds = []
    build = attention_kernels._build_block_table
    monkeypatch.setattr(attention_kernels, "_build_block_table", lambda *args: builds.append(args) or build(*args))
    cu = torch.tensor([0, 5, 37], dtype=torch.int32)
    warm = attention_kernels.block_table(cu, 40, 16)
    assert attention_kernels.block_table(cu, 40, 16) is warm and len(builds) == 1
    monkeypatch.setattr(attention_kernels, "_capturing", lambda tensor: True)
    captured = [attention_kernels.block_table(cu, 40, 16) for _ in range(2)]
    assert len(builds) == 3 and all(table is not warm for table in captured)
    assert all(torch.equal(table, warm) for table in captured)
    monkeypatch.setattr(attention_kernels, "_capturing", lambda tensor: False)
    assert attention_kernels.block_table(cu, 40, 16) is warm, "a table built in a capture must not be cached"


def test_compiled_attention_builds_its_block_tables_without_keeping_them(small_tiles, monkeypatch):
    """Inside torch.compile every call builds its tables and none is kept on `cu_seqlens`: CUDA-graph
    trees (mode="reduce-overhead") warm a graph up with its allocations in the graph's private
    pool, and a table kept from there outlives the run (torch raised "tensor(s) in the cudagraph
    pool not tracked as outputs" on an H200). Eager calls keep them for the next layer."""
    builds = []
    build = attention_kernels._build_block_table
    monkeypatch.setattr(attention_kernels, "_build_block_table", lambda *args: builds.append(args) or build(*args))
    q, k, v, cu = _attention_inputs()
    leaves = tuple(t.requires_grad_() for t in (q, k, v))

    def step(q, k, v, cu):
        return padfree.varlen_attention(q, k, v, cu, cu, 20, 20, causal=True).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got = torch.autograd.grad(compiled(*leaves, cu), leaves)
    assert len(builds) == 6, "forward, dk/dv and dq build one table each, every step"
    assert not hasattr(cu, "_padfree_block_tables")
    builds.clear()
    for _ in range(2):
        want = torch.autograd.grad(step(*leaves, cu), leaves)
    assert len(builds) == 2 and hasattr(cu, "_padfree_block_tables"), "eager: the query and key tables, once"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _capture(fn):
    """Warm up on a side stream, then capture `fn` into a graph; returns (graph, its outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.mark.gpu
def test_gpu_graph_replay_uses_new_offsets():
    # 500 + 12 tokens, then 12 + 500: the second layout has its long sequence second, so a stale
    # table from the warm-up would leave most of its blocks unwritten.
    static_cu = torch.tensor([0, 500, 512], dtype=torch.int32, device="cuda")
    q = torch.randn(512, 4, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])

    def run():
        return padfree.varlen_attention(q, k, v, static_cu, static_cu, 512, 512, causal=True, check=False)

    graph, out = _capture(run)
    static_cu.copy_(torch.tensor([0, 12, 512], dtype=torch.int32, device="cuda"))
    graph.replay()
    fresh = torch.tensor([0, 12, 512], dtype=torch.int32, device="cuda")
    torch.testing.assert_close(out, padfree.varlen_attention(q, k, v, fresh, fresh, 512, 512, causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["attention", "lora"])
def test_gpu_graph_replays_draw_new_dropout_masks(op):
    if op == "attention":
        cu = torch.tensor([0, 300, 512], dtype=torch.int32, device="cuda")
        q = torch.randn(512, 4, 64, device="cuda", dtype=torch.float16)

        def run():
            return padfree.varlen_attention(q, q, q, cu, cu, 512, 512, dropout_p=0.3, check=False)
    else:
        x = torch.randn(512, 256, device="cuda", dtype=torch.float16)
        weight, lora_a, lora_b = (torch.randn(*s, device="cuda", dtype=torch.float16)
                                  for s in ((128, 256), (8, 256), (128, 8)))

        def run():
            return padfree.lora_linear(x, weight, None, lora_a, lora_b, 2.0, dropout_p=0.3)

    graph, out = _capture(run)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, out)


@pytest.mark.gpu
def test_gpu_reduce_overhead_compile_follows_new_offsets_and_draws_new_masks():
    """torch.compile(mode="reduce-overhead") records CUDA graphs and replays them with the inputs
    copied into its static buffers: new offsets must be honoured and dropout must not repeat."""
    q = torch.randn(512, 4, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])

    @torch.compile(mode="reduce-overhead")
    def causal(q, k, v, cu):
        return padfree.varlen_attention(q, k, v, cu, cu, 512, 512, causal=True)

    @torch.compile(mode="reduce-overhead")
    def dropped(q, k, v, cu):
        return padfree.varlen_attention(q, k, v, cu, cu, 512, 512, dropout_p=0.3)

    for layout in ([0, 500, 512], [0, 12, 512], [0, 256, 300, 512]):
        cu = torch.tensor(layout, dtype=torch.int32, device="cuda")
        for _ in range(3):  # warm-up, recording, replay
            got = causal(q, k, v, cu).clone()
        torch.testing.assert_close(got, padfree.varlen_attention(q, k, v, cu, cu, 512, 512, causal=True))
    cu = torch.tensor([0, 300, 512], dtype=torch.int32, device="cuda")
    outputs = [dropped(q, k, v, cu).clone() for _ in range(4)]
    assert all(torch.isfinite(out).all() for out in outputs)
    assert not torch.equal(outputs[-1], outputs[-2])
