import pytest
import torch

from padfree.benchmark import batches, distributions

LENGTHS = distributions.builtin_lengths("flan", 60, seed=1, max_length=128)
TOKENS_PER_STEP = 256


def _examples():
    return batches.make_examples(LENGTHS, vocab_size=50, seed=0)


def test_greedy_steps_keep_order_and_budget():
    steps = batches.greedy_steps(LENGTHS, TOKENS_PER_STEP)
    assert [i for step in steps for i in step] == list(range(len(LENGTHS)))
    for step, following in zip(steps, steps[1:]):
        used = sum(LENGTHS[i] for i in step)
        assert used <= TOKENS_PER_STEP < used + LENGTHS[following[0]]


def test_budget_below_the_longest_example_is_rejected():
    with pytest.raises(ValueError, match="tokens_per_step"):
        batches.greedy_steps([10, 300], 256)


def _steps_and_examples():
    return batches.greedy_steps(LENGTHS, TOKENS_PER_STEP)[:5], _examples()


@pytest.mark.parametrize("mode", ["padded", "naive_packing"])
def test_same_examples_and_useful_tokens_per_step_as_padded(mode):
    steps, examples = _steps_and_examples()
    reference = batches.build_batches("padded", examples, steps, TOKENS_PER_STEP)
    built = batches.build_batches(mode, examples, steps, TOKENS_PER_STEP)
    assert [b.example_indices for b in built] == steps
    assert [b.useful_tokens for b in built] == [b.useful_tokens for b in reference] \
        == [sum(LENGTHS[i] for i in step) for step in steps]


def test_padding_free_batches_match_padded_per_step():
    steps, examples = _steps_and_examples()
    padded = batches.build_batches("padded", examples, steps, TOKENS_PER_STEP)
    packed = batches.build_batches("padding_free", examples, steps, TOKENS_PER_STEP)
    for a, b in zip(padded, packed):
        assert a.useful_tokens == b.useful_tokens == b.processed_tokens
        assert torch.equal(b.inputs["input_ids"][0], a.inputs["input_ids"][a.inputs["attention_mask"].bool()])
        lengths = [LENGTHS[i] for i in b.example_indices]
        expected = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        assert torch.equal(b.inputs["cu_seq_lens_q"], expected)


def test_padded_sorted_regroups_the_same_examples_within_budget():
    steps, examples = _steps_and_examples()
    built = batches.build_batches("padded_sorted", examples, steps, TOKENS_PER_STEP)
    assert sorted(i for b in built for i in b.example_indices) == sorted(i for s in steps for i in s)
    assert all(b.useful_tokens <= TOKENS_PER_STEP for b in built)
    assert sum(b.useful_tokens for b in built) == sum(LENGTHS[i] for s in steps for i in s)
    padded = batches.build_batches("padded", examples, steps, TOKENS_PER_STEP)
    assert sum(b.processed_tokens for b in built) <= sum(b.processed_tokens for b in padded)


def test_padded_batch_layout():
    examples = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    batch = batches.padded_batch(examples, [0, 1])
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.inputs["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert (batch.useful_tokens, batch.processed_tokens) == (5, 6)


def test_naive_packing_masks_each_examples_first_token_like_padding_free():
    examples = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    batch = batches.naive_packed_batch(examples, [0, 1])
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch.inputs["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "position_ids" not in batch.inputs and batch.fill_ratio == 1.0


def test_examples_are_seeded_and_never_use_the_pad_id():
    first, second = _examples(), _examples()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(int(e.min()) >= 1 and int(e.max()) < 50 for e in first)
    assert [len(e) for e in first] == LENGTHS


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        batches.build_batches("bucketed", _examples(), [[0]], TOKENS_PER_STEP)
