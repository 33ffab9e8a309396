"""padfree: padding-free fine-tuning kernels for Hugging Face models.

Public API (see README.md):
    varlen_attention, lora_linear, moe_route, moe_experts   ops (torch custom ops, autograd)
    lora_mixture_linear, lora_per_sequence_linear           several LoRA adapters on one base layer
    lora_mixture_linear_shared                              ... on several layers reading one input (q/k/v)
    patch, unpatch                                          switch a transformers/PEFT model over
    register                                                make "padfree" an attn_implementation
    use_backend                                             "auto" | "triton" | "cuda" | "reference"

Importing padfree has no side effects beyond defining its torch custom ops: nothing in
transformers is registered or patched until `patch` or `register` is called, and triton /
`padfree._C` are only loaded when an op first needs them.
"""

from padfree import _lazy
from padfree._backend import use_backend

__version__ = "0.1.0"

_LAZY = {
    "varlen_attention": "padfree.ops.attention",
    "lora_linear": "padfree.ops.lora",
    "moe_route": "padfree.ops.moe",
    "moe_experts": "padfree.ops.moe",
    "lora_mixture_linear": "padfree.ops.lora_mixture",
    "lora_mixture_linear_shared": "padfree.ops.lora_mixture",
    "lora_per_sequence_linear": "padfree.ops.lora_mixture",
    "patch": "padfree.hf.patch",
    "unpatch": "padfree.hf.patch",
    "register": "padfree.hf.attention",
}

__all__ = ["use_backend", "__version__", *_LAZY]


__getattr__, __dir__ = _lazy.exports("padfree", globals(), _LAZY)
