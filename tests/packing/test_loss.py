import pytest
import torch
import torch.nn.functional as F

from padfree.packing import PaddingFreeCollator, count_loss_sequences, count_loss_tokens, packed_cross_entropy

VOCAB = 13


def make_sequences(lengths):
    """Random token ids, completion-only labels (a random prompt masked) and per-sequence logits."""
    sequences = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,))
        labels = ids.clone()
        labels[: int(torch.randint(0, n, ()))] = -100
        logits = torch.randn(n, VOCAB, dtype=torch.float64)
        sequences.append((ids, labels, logits))
    return sequences


def pack(sequences):
    batch = PaddingFreeCollator()([{"input_ids": ids, "labels": labels} for ids, labels, _ in sequences])
    logits = torch.cat([logits for _, _, logits in sequences])[None].requires_grad_()
    return batch, logits


def unpacked_token_sum_and_count(sequences, logits_list=None):
    total, count = 0.0, 0
    for k, (_, labels, logits) in enumerate(sequences):
        logits = logits if logits_list is None else logits_list[k]
        targets = labels[1:]
        total = total + F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return total, count


@pytest.mark.parametrize("lengths", [[1], [4, 1, 6], [2, 9, 3, 3, 1]])
def test_token_reduction_equals_unpacked_token_mean(lengths):
    sequences = make_sequences(lengths)
    batch, logits = pack(sequences)
    total, count = unpacked_token_sum_and_count(sequences)
    expected = torch.as_tensor(total / max(count, 1), dtype=torch.float64)
    for cu_seqlens in (None, batch["cu_seq_lens_q"]):
        torch.testing.assert_close(packed_cross_entropy(logits, batch["labels"], cu_seqlens=cu_seqlens), expected)
    assert int(count_loss_tokens(batch["labels"])) == count


def test_gradients_equal_unpacked():
    sequences = make_sequences([5, 2, 7])
    batch, logits = pack(sequences)
    packed_cross_entropy(logits, batch["labels"], cu_seqlens=batch["cu_seq_lens_q"]).backward()
    separate = [logits.detach().clone().requires_grad_() for _, _, logits in sequences]
    total, count = unpacked_token_sum_and_count(sequences, separate)
    (total / count).backward()
    torch.testing.assert_close(logits.grad[0], torch.cat([s.grad for s in separate]))


def test_matches_transformers_causal_lm_loss():
    transformers_loss = pytest.importorskip("transformers.loss.loss_utils")
    sequences = make_sequences([3, 6, 4])
    batch, logits = pack(sequences)
    logits = logits.detach().float()
    for num_items in (None, 17):
        expected = transformers_loss.ForCausalLMLoss(logits, batch["labels"], VOCAB, num_items_in_batch=num_items)
        torch.testing.assert_close(packed_cross_entropy(logits, batch["labels"], num_items_in_batch=num_items),
                                   expected)


def test_gradient_accumulation_equals_full_batch():
    sequences = make_sequences([3, 8, 1, 5, 6, 2, 4])
    batch, logits = pack(sequences)
    full = packed_cross_entropy(logits, batch["labels"], cu_seqlens=batch["cu_seq_lens_q"])
    full.backward()
    micro_batches = [pack(sequences[:2]), pack(sequences[2:3]), pack(sequences[3:])]
    num_items = sum(count_loss_tokens(mb["labels"]) for mb, _ in micro_batches)
    accumulated = 0.0
    for mb, mb_logits in micro_batches:
        loss = packed_cross_entropy(mb_logits, mb["labels"], num_items_in_batch=num_items,
                                    cu_seqlens=mb["cu_seq_lens_q"])
        loss.backward()
        accumulated = accumulated + loss.detach()
    torch.testing.assert_close(accumulated, full.detach())
    torch.testing.assert_close(torch.cat([mb_logits.grad[0] for _, mb_logits in micro_batches]), logits.grad[0])


def test_sequence_reduction():
    sequences = make_sequences([4, 6, 1, 3])
    sequences[1][1][:] = -100  # a sequence with no loss token is left out
    batch, logits = pack(sequences)
    means = []
    for _, labels, seq_logits in sequences:
        targets = labels[1:]
        if (targets != -100).any():
            means.append(F.cross_entropy(seq_logits[:-1], targets, ignore_index=-100))
    expected = torch.stack(means).mean()
    cu = batch["cu_seq_lens_q"]
    torch.testing.assert_close(packed_cross_entropy(logits, batch["labels"], reduction="sequence", cu_seqlens=cu),
                               expected)
    assert int(count_loss_sequences(batch["labels"], cu)) == len(means)
    halves = [pack(sequences[:2]), pack(sequences[2:])]
    num_items = sum(count_loss_sequences(mb["labels"], mb["cu_seq_lens_q"]) for mb, _ in halves)
    accumulated = sum(packed_cross_entropy(mb_logits, mb["labels"], num_items_in_batch=num_items,
                                           reduction="sequence", cu_seqlens=mb["cu_seq_lens_q"])
                      for mb, mb_logits in halves)
    torch.testing.assert_close(accumulated, expected)


def test_cu_seqlens_masks_boundaries_and_padding_tail():
    logits = torch.randn(1, 8, VOCAB)
    labels = torch.randint(0, VOCAB, (1, 8))  # no -100 at the boundary: cu_seqlens still keeps it out
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)  # positions 6, 7 are a padding tail
    loss = packed_cross_entropy(logits, labels, cu_seqlens=cu)
    expected = torch.cat([F.cross_entropy(logits[0, 0:2], labels[0, 1:3], reduction="none"),
                          F.cross_entropy(logits[0, 3:5], labels[0, 4:6], reduction="none")]).mean()
    torch.testing.assert_close(loss, expected)


def test_two_dimensional_logits_and_low_precision():
    sequences = make_sequences([3, 5])
    batch, logits = pack(sequences)
    flat = packed_cross_entropy(logits[0].half(), batch["labels"][0])
    assert flat.dtype == torch.float32
    reference = packed_cross_entropy(logits[0].half().float(), batch["labels"][0])
    torch.testing.assert_close(flat, reference)


def test_no_loss_token_gives_zero_not_nan():
    logits = torch.randn(1, 4, VOCAB, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss = packed_cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"labels": torch.zeros(1, 5, dtype=torch.long)}, ValueError, "labels must have shape"),
    ({"labels": torch.zeros(1, 4)}, TypeError, "labels must hold integer"),
    ({"logits": torch.randn(4)}, ValueError, "logits must have shape"),
    ({"logits": torch.zeros(1, 4, VOCAB, dtype=torch.long)}, TypeError, "logits must be floating point"),
    ({"reduction": "mean"}, ValueError, "reduction must be one of"),
    ({"reduction": "sequence"}, ValueError, "needs cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0, 2, 4])}, TypeError, "cu_seqlens must be int32"),
    ({"cu_seqlens": torch.tensor([0, 3, 2], dtype=torch.int32)}, ValueError, "non-decreasing"),
    ({"cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}, ValueError, "exceeds the number of tokens 4"),
    ({"logits": torch.randn(2, 4, VOCAB), "labels": torch.zeros(2, 4, dtype=torch.long),
      "cu_seqlens": torch.tensor([0, 4], dtype=torch.int32)}, ValueError, "one packed row"),
])
def test_bad_input(kwargs, error, match):
    args = {"logits": torch.randn(1, 4, VOCAB), "labels": torch.zeros(1, 4, dtype=torch.long)} | kwargs
    with pytest.raises(error, match=match):
        packed_cross_entropy(**args)
