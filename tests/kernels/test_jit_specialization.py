"""The kernels compile the way Triton's JIT specializes a real launch, and batch-varying integers
do not make it compile new variants.

Triton's JIT (not the interpreter) turns an int argument equal to 1 into a constant and hints
multiples of 16; `do_not_specialize` turns both off for an argument. These tests take the launch
arguments the launchers really pass (captured instead of launched) and run them through the JIT's
own binder (`create_function_from_signature`, what `JITFunction.run` calls) for sm_80.
"""

import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import JITFunction, create_function_from_signature

from padfree.kernels import attention, lora, lora_mixture, moe
from padfree.ops import moe as moe_ops

# every kernel the grouped MoE and many-experts mixture launchers start
MOE_AND_MIXTURE_KERNELS = {
    *(f"lora_mixture_{name}_kernel" for name in ("shrink", "grad_h", "weight_grad", "grad_x")),
    *(f"moe_{name}_kernel" for name in ("gate_up", "down", "down_backward", "gate_up_backward_input",
                                        "down_weight_grad", "gate_up_weight_grad"))}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(module, launches: list, replace=setattr) -> list:
    """Replace every `*_kernel` of `module` by a `Recorder` appending to `launches`."""
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        replace(module, name, Recorder(getattr(module, name), launches))
    return launches


# Launches recorded, then compiled as the JIT would; runs without TRITON_INTERPRET (compiled kernels).
_COMPILE_SCRIPT = '''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from padfree.kernels import attention, lora, lora_mixture, moe
from tests.kernels.test_jit_specialization import mixture_launches, moe_launches, record_launches

launches = []
for module in (attention, lora, moe, lora_mixture):
    record_launches(module, launches)

# One row / one token, rank 1: every batch-varying integer is 1 (and the seed, read on the device).
SEED = torch.tensor(1)
x, weight, lora_a, lora_b = (torch.randn(*s, dtype=torch.float16) for s in ((1, 64), (32, 64), (1, 64), (32, 1)))
lora.forward(x, [weight], [None], lora_a, [lora_b], [1], [2.0], 0.1, SEED)
dy, t = torch.randn(1, 32, dtype=torch.float16), torch.randn(1, 1, dtype=torch.float16)
lora.backward_input_and_a([dy], x, [weight], t, lora_a, [1], 0.1, SEED)
q = torch.randn(1, 2, 64, dtype=torch.float16)
cu = torch.tensor([0, 1], dtype=torch.int32)
out, lse = attention.forward(q, q, q, cu, cu, 1, 0.125, -1, 0, 0.0, None, 0.1, SEED)
attention.backward(q, q, q, q, q, lse, cu, cu, 1, 0.125, -1, 0, 0.0, None, 0.1, SEED)
# the many-experts mixture (257 experts of rank 1) and a MoE layer with every dimension 1
mixture_launches(1, 257, 1, 1)
moe_launches(1, 1, 1, 1)

target = GPUTarget("cuda", 80, 32)
backend = make_backend(target)
for kernel, args, kwargs in launches:
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    constant = [name for name, param in zip(signature, kernel.params)
                if signature[name] == "constexpr" and not param.is_constexpr]
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ttir = compiled.asm["ttir"]
        print("COMPILED", kernel.fn.__name__, "atomics=%d" % ttir.count("tt.atomic"), "dots=%d" % ttir.count("tt.dot"),
              ",".join(constant))
    except Exception as error:
        cause = error.__cause__ or error
        print("FAILED", kernel.fn.__name__, type(cause).__name__, str(cause).strip().splitlines()[0][:200])
'''


@pytest.fixture(scope="module")
def compiled_for_sm80():
    """{kernel name: (status, details)} for every launch of the script above, compiled in a
    subprocess (the tests run the kernels interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split(" ", 2) for line in done.stdout.splitlines() if line.startswith(("COMPILED", "FAILED"))]
    results = {}
    for status, name, rest in lines:  # a kernel launched twice (moe_down_kernel) keeps a failure
        if name not in results or status == "FAILED":
            results[name] = (status, rest)
    return results


@pytest.mark.slow
def test_launches_with_every_batch_varying_integer_equal_to_one_compile_for_sm80(compiled_for_sm80):
    """A dropout seed of 1 passed as an int became a constant and `seed.to(...)` failed to compile
    (about one call in 2^31); so did `R.to(...)` in the many-experts mixture at rank 1. Every kernel
    the LoRA, attention, MoE and mixture launchers start is compiled here exactly as the JIT would
    for one token, rank 1 (and a MoE layer with every dimension 1), with the seed 1 (now read on the
    device)."""
    failed = {name: rest for name, (status, rest) in compiled_for_sm80.items() if status == "FAILED"}
    assert not failed, failed
    assert set(compiled_for_sm80) == {
        "lora_shrink_kernel", "lora_forward_kernel", "lora_dx_kernel", "lora_da_kernel", "attention_fwd_kernel",
        "attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
        *MOE_AND_MIXTURE_KERNELS}
    for name, (_, rest) in compiled_for_sm80.items():
        constants = set(rest.split()[-1].split(",")) if len(rest.split()) > 2 else set()
        assert not constants & {"M", "total_q", "num_seqs", "num_blocks"}, (name, constants)


@pytest.mark.slow
def test_attention_backward_kernels_use_no_atomics(compiled_for_sm80):
    """The backward is bitwise reproducible run to run because every gradient element is written by
    one program (no atomic accumulation): the compiled backward kernels, dropout on, hold matrix
    products but no atomic operation."""
    for name in ("attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
        status, rest = compiled_for_sm80[name]
        assert status == "COMPILED", (name, rest)
        counts = dict(field.split("=") for field in rest.split() if "=" in field)
        assert counts["atomics"] == "0", (name, rest)
    assert compiled_for_sm80["attention_bwd_dq_kernel"][1].split()[1] != "dots=0"


def _jit(kernel) -> JITFunction:
    """The compiled-mode JITFunction of an interpreted kernel, with the same specialization options."""
    return JITFunction(kernel.fn, **kernel.kwargs)


def _specialization(kernel, args, kwargs):
    """What the JIT keys its compile cache on for this launch (types and value-1 / alignment hints)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    jit = _jit(kernel)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 80, 32)))
    return binder(*args, **kwargs)[1]


def _record(monkeypatch, module):
    return record_launches(module, [], monkeypatch.setattr)


def _lora_launches(rows, seed):
    x = torch.randn(rows, 64)
    weight, lora_a, lora_b = torch.randn(32, 64), torch.randn(4, 64), torch.randn(32, 4)
    seed = torch.tensor(seed)
    lora.forward(x, [weight], [None], lora_a, [lora_b], [4], [2.0], 0.1, seed)
    lora.backward_input_and_a([torch.randn(rows, 32)], x, [weight], torch.randn(rows, 4), lora_a, [4], 0.1, seed)


def mixture_launches(tokens, experts, rank, top_k, seed=7, dtype=torch.float16):
    """The LoRA mixture's forward and backward on the many-experts kernels (experts * rank > 256)."""
    k, n = 64, 32
    x, weight = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    dy = torch.randn(tokens, n, dtype=dtype)
    lora_a, lora_b = torch.randn(experts, rank, k, dtype=dtype), torch.randn(experts, n, rank, dtype=dtype)
    index = (torch.arange(tokens)[:, None] + torch.arange(top_k)) % experts
    weights, seed = torch.rand(tokens, top_k), torch.tensor(seed)
    _, h = lora_mixture.forward(x, weight, None, lora_a, lora_b, 2.0, index, weights, 0.1, seed)
    lora_mixture.backward(dy, x, weight, h, lora_a, lora_b, 2.0, index, weights, 0.1, seed)


def moe_launches(tokens, hidden, inter, top_k, experts=4, dtype=torch.float16):
    """The grouped MoE layer's forward and backward kernels."""
    x, dy = torch.randn(tokens, hidden, dtype=dtype), torch.randn(tokens, hidden, dtype=dtype)
    gate_up_proj = torch.randn(experts, 2 * inter, hidden, dtype=dtype)
    down_proj = torch.randn(experts, hidden, inter, dtype=dtype)
    index = (torch.arange(tokens)[:, None] + torch.arange(top_k)) % experts
    weights = torch.rand(tokens * top_k)
    sorted_pairs, block_expert, padded_offsets, pair_position = moe_ops.moe_align(index, experts, moe.ALIGN_BLOCK)
    _, gate_up = moe.forward(x, gate_up_proj, down_proj, weights, top_k, sorted_pairs, block_expert)
    moe.backward(dy, x, gate_up_proj, down_proj, weights, gate_up, top_k, sorted_pairs, block_expert,
                 padded_offsets, pair_position)


def _attention_launches(lengths, seed, max_seqlen):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 2, 64)
    seed = torch.tensor(seed)
    out, lse = attention.forward(q, q, q, cu, cu, max_seqlen, 0.125, -1, 0, 0.0, None, 0.1, seed)
    attention.backward(q, q, q, q, q, lse, cu, cu, max_seqlen, 0.125, -1, 0, 0.0, None, 0.1, seed)


def _keys(launches):
    return [(kernel.fn.__name__, _specialization(kernel, args, kwargs)) for kernel, args, kwargs in launches]


def test_lora_kernels_compile_once_for_every_row_count_and_seed(monkeypatch):
    launches = _record(monkeypatch, lora)
    keys = []
    for rows, seed in ((1, 1), (16, 16), (37, 12345), (256, 2**31 - 2)):
        launches.clear()
        _lora_launches(rows, seed)
        keys.append(_keys(launches))
    assert {name for name, _ in keys[0]} == {"lora_shrink_kernel", "lora_forward_kernel", "lora_dx_kernel",
                                             "lora_da_kernel"}
    assert all(key == keys[0] for key in keys[1:])


def test_moe_and_mixture_kernels_compile_once_for_every_token_count(monkeypatch):
    """Token (so pair and capacity) counts of 1, multiples of 16 and others: one compiled variant per
    grouped MoE and many-experts mixture kernel. The weight-gradient kernels once named an argument
    they do not have in do_not_specialize, so their token count made new variants."""
    launches = record_launches(moe, [], monkeypatch.setattr)
    record_launches(lora_mixture, launches, monkeypatch.setattr)
    variants = {}
    for tokens, seed in ((1, 1), (16, 16), (37, 12345), (256, 2**31 - 2)):
        launches.clear()
        mixture_launches(tokens, 20, 16, 2, seed)
        moe_launches(tokens, 64, 32, 2)
        seen = []
        for name, key in _keys(launches):  # the weight-gradient kernel runs twice (dA, dB): the nth launch
            seen.append(name)
            variants.setdefault((name, seen.count(name)), set()).add(tuple(key))
    assert {name for name, _ in variants} == MOE_AND_MIXTURE_KERNELS
    assert all(len(keys) == 1 for keys in variants.values()), {n: k for n, k in variants.items() if len(k) > 1}


def test_attention_kernels_compile_once_for_every_batch_and_max_seqlen(monkeypatch):
    """Token, block and sequence counts of 1, multiples of 16 and others, and max_seqlen from 1 to
    4096 (any upper bound is valid): one compiled variant per kernel, and per value of the STRIDED
    constexpr (tables with more entries than programs) for the block-table kernels; with one
    spare program, the batch of 40 short sequences takes the strided variant."""
    monkeypatch.setattr(attention, "SPARE_PROGRAMS", 1)
    launches = _record(monkeypatch, attention)
    variants = {}
    for lengths, seed, max_seqlen in (([1], 1, 1), ([16, 16], 16, 4096), ([5, 30, 2], 12345, 30),
                                      ([64] * 4, 2**31 - 2, 100), ([3] * 40, 7, 3)):
        launches.clear()
        _attention_launches(lengths, seed, max_seqlen)
        for (name, key), (_, _, kwargs) in zip(_keys(launches), launches):
            variants.setdefault((name, kwargs.get("STRIDED")), set()).add(tuple(key))
    assert set(variants) == {("attention_bwd_delta_kernel", None)} | {
        (name, strided) for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
        for strided in (False, True)}
    assert all(len(keys) == 1 for keys in variants.values()), variants
