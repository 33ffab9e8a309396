"""Head offsets past 2^31 elements: a head-major q (128 heads x 132k tokens x 128 in training, here
3 heads 2^30 elements apart) puts head 2 at 2^31 + 128 elements. An int32 `head * stride_h`
wraps negative and the kernels read outside q (a crash or garbage).

q is a view on 4 GB of reserved but untouched memory: only the pages of the 24 tokens are ever
written, so the test needs little real memory. It runs in a subprocess, because the wrapped
address crashes the interpreter with a segmentation fault.
"""

import os
import subprocess
import sys

import torch

from padfree.reference import attention as reference
from tests.numerics import assert_close

_SCRIPT = '''
import sys

import torch

from padfree.kernels import attention as kernels
from padfree.reference import attention as reference

heads, dim, total = 3, 16, 24
head_stride = 2**30 + 64
try:
    storage = torch.empty(heads * head_stride, dtype=torch.float16)
except RuntimeError as error:
    print("NO_MEMORY", error)
    raise SystemExit(0)
q = storage.as_strided((total, heads, dim), (dim, head_stride, 1))
q.copy_(torch.randn(total, heads, dim))
k, v = (torch.randn(total, 1, dim, dtype=torch.float16) for _ in range(2))
dout = torch.randn(total, heads, dim, dtype=torch.float16)
cu = torch.tensor([0, 10, 24], dtype=torch.int32)
args = (cu, cu, 14, 0.25, -1, 0, 0.0, None, 0.0, torch.tensor(0))
with kernels.override_tiles(16, 16):
    out, lse = kernels.forward(q, k, v, *args)
    grads = kernels.backward(dout, q, k, v, out, lse, *args)
torch.save(dict(q=q.contiguous(), k=k, v=v, dout=dout, out=out, dq=grads[0], dk=grads[1], dv=grads[2]),
           sys.argv[1])
'''


def test_head_offsets_past_two_to_the_31_elements(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PADFREE_POISON_OUTPUTS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = tmp_path / "result.pt"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(result)], capture_output=True, text=True, env=env,
                          cwd=root)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    assert "NO_MEMORY" not in done.stdout, "could not reserve 4 GB of address space: " + done.stdout
    got = torch.load(result)
    q, k, v, dout = got["q"], got["k"], got["v"], got["dout"]
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    args = (cu, cu, 0.25, -1, 0)
    wide = [t.double() for t in (q, k, v)]
    oracle, _ = reference.attention(*wide, *args)
    baseline, _ = reference.attention(q, k, v, *args, upcast=False)
    assert_close("out", got["out"], oracle, baseline, factor=2)
    oracle_grads = reference.attention_backward(dout.double(), *wide, *args)
    baseline_grads = reference.attention_backward(dout, q, k, v, *args, upcast=False)
    for name, want, base in zip(("dq", "dk", "dv"), oracle_grads, baseline_grads):
        assert_close(name, got[name], want, base, factor=3)
