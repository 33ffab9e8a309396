"""Model proofs: for every architecture in padfree's table, fp32, reference and Triton backends, a
packed batch through padfree gives the same per-token logits, loss and every parameter gradient as
the sequences one by one and as a padded batch with an attention mask (both eager)."""

from __future__ import annotations

import pytest
import torch

import padfree
from padfree import verify
from padfree.hf.models import ARCHITECTURES

LENGTHS = (5, 17, 3, 9)  # 17 > the tiny sliding window (4); 3 < it


# The padded batch through padfree (its unpadding path) on the interpreted kernels only where the
# attention options differ most; every architecture runs it on the reference backend.
PADDED_ON_TRITON = ("gemma2", "gemma3_text", "mistral")


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_equals_one_by_one_and_padded(model_type, backend):
    model = ARCHITECTURES[model_type].build_model()
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    padded_padfree = backend == "reference" or model_type in PADDED_ON_TRITON
    checks = verify.verify_model(model, sequences, tol=1e-5, per_parameter=True, padded_padfree=padded_padfree)
    failed = [c for c in checks if not c.ok]
    assert not failed, verify.format_table(failed)
    comparisons = 3 if padded_padfree else 2
    assert len(checks) == comparisons * (2 + sum(1 for p in model.parameters() if p.requires_grad))
    assert model.config._attn_implementation == "eager"


def test_concatenation_without_padfree_differs():
    """The same packed row with eager attention and no boundaries mixes sequences: logits differ."""
    model = ARCHITECTURES["llama"].build_model()
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    alone = verify.run_one_by_one(model, sequences)
    concatenated = verify.run_batch(model, verify.concatenated_batch(sequences))
    first = len(sequences[0])
    torch.testing.assert_close(concatenated.logits[:first], alone.logits[:first], rtol=1e-5, atol=1e-5)
    assert (concatenated.logits[first:] - alone.logits[first:]).abs().max() > 1e-2
    assert (concatenated.loss - alone.loss).abs() > 1e-4


def test_packed_row_with_padfree_but_no_boundaries_is_one_sequence():
    """padfree only knows boundaries it is told: a row without resets is one causal sequence."""
    model = ARCHITECTURES["llama"].build_model()
    sequences = verify.random_sequences(LENGTHS, model.config.vocab_size)
    with torch.no_grad():
        eager = model(input_ids=torch.cat(sequences)[None]).logits
        padfree.patch(model, lora=False, moe=False)
        patched = model(input_ids=torch.cat(sequences)[None]).logits
    torch.testing.assert_close(patched, eager, rtol=1e-5, atol=1e-5)
