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

from padfree.kernels import attention, lora

# Launches recorded, then compiled as the JIT would; runs without TRITON_INTERPRET (compiled kernels).
_COMPILE_SCRIPT = '''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from padfree.kernels import attention, lora

launches = []


class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


for module in (attention, lora):
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        setattr(module, name, Recorder(getattr(module, name)))

# One row / one token, rank 1: every batch-varying integer is 1 (and the seed, read on the device).
SEED = torch.tensor(1)
x, weight, lora_a, lora_b = (torch.randn(*s, dtype=torch.float16) for s in ((1, 64), (32, 64), (1, 64), (32, 1)))
lora.forward(x, [weight], [None], lora_a, [lora_b], [1], [2.0], 0.1, SEED)
dy, t = torch.randn(1, 32, dtype=torch.float16), torch.randn(1, 1, dtype=torch.float16)
lora.backward_input_and_a([dy], x, [weight], t, lora_a, [1], 0.1, SEED)
q = torch.randn(1, 2, 64, dtype=torch.float16)
cu = torch.tensor([0, 1], dtype=torch.int32)
out, lse = attention.forward(q, q, q, cu, cu, 1, 1, 0.125, -1, 0, 0.0, None, 0.1, SEED)
attention.backward(q, q, q, q, q, lse, cu, cu, 1, 1, 0.125, -1, 0, 0.0, None, 0.1, SEED)

target = GPUTarget("cuda", 80, 32)
backend = make_backend(target)
for kernel, args, kwargs in launches:
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    constant = [name for name, param in zip(signature, kernel.params)
                if signature[name] == "constexpr" and not param.is_constexpr]
    try:
        triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        print("COMPILED", kernel.fn.__name__, ",".join(constant))
    except Exception as error:
        cause = error.__cause__ or error
        print("FAILED", kernel.fn.__name__, type(cause).__name__, str(cause).strip().splitlines()[0][:200])
'''


@pytest.mark.slow
def test_launches_with_every_batch_varying_integer_equal_to_one_compile_for_sm80():
    """A dropout seed of 1 passed as an int became a constant and `seed.to(...)` failed to compile
    (about one call in 2^31). Every kernel the LoRA and attention launchers start is compiled here
    exactly as the JIT would for one token and rank 1, with the seed 1 (now read on the device)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split(" ", 2) for line in done.stdout.splitlines() if line.startswith(("COMPILED", "FAILED"))]
    failed = [line for line in lines if line[0] == "FAILED"]
    assert not failed, failed
    compiled = {line[1]: line[2] if len(line) > 2 else "" for line in lines}
    assert set(compiled) == {"lora_shrink_kernel", "lora_forward_kernel", "lora_dx_kernel", "lora_da_kernel",
                             "attention_fwd_kernel", "attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel",
                             "attention_bwd_dq_kernel"}, done.stdout
    for name, constants in compiled.items():
        assert not set(constants.split(",")) & {"M", "seed", "total_q", "num_seqs", "num_blocks"}, (name, constants)


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
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return launches


def _lora_launches(rows, seed):
    x = torch.randn(rows, 64)
    weight, lora_a, lora_b = torch.randn(32, 64), torch.randn(4, 64), torch.randn(32, 4)
    seed = torch.tensor(seed)
    lora.forward(x, [weight], [None], lora_a, [lora_b], [4], [2.0], 0.1, seed)
    lora.backward_input_and_a([torch.randn(rows, 32)], x, [weight], torch.randn(rows, 4), lora_a, [4], 0.1, seed)


def _attention_launches(lengths, seed):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 2, 64)
    seed = torch.tensor(seed)
    out, lse = attention.forward(q, q, q, cu, cu, max(lengths), max(lengths), 0.125, -1, 0, 0.0, None, 0.1, seed)
    attention.backward(q, q, q, q, q, lse, cu, cu, max(lengths), max(lengths), 0.125, -1, 0, 0.0, None, 0.1, seed)


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


def test_attention_kernels_compile_once_for_every_batch(monkeypatch):
    launches = _record(monkeypatch, attention)
    keys = []
    for lengths, seed in (([1], 1), ([16, 16], 16), ([5, 30, 2], 12345), ([64] * 4, 2**31 - 2)):
        launches.clear()
        _attention_launches(lengths, seed)
        keys.append(_keys(launches))
    assert {name for name, _ in keys[0]} == {"attention_fwd_kernel", "attention_bwd_delta_kernel",
                                             "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    assert all(key == keys[0] for key in keys[1:])
