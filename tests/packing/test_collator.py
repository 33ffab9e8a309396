import numpy as np
import pytest
import torch

from padfree.packing import PaddingFreeCollator

transformers = pytest.importorskip("transformers")


def random_examples(lengths, with_labels=False):
    examples = []
    for n in lengths:
        ids = torch.randint(1, 1000, (n,)).tolist()
        example = {"input_ids": ids, "attention_mask": [1] * n}
        if with_labels:
            prompt = int(torch.randint(0, n, ()))
            example["labels"] = [-100] * prompt + ids[prompt:]
        examples.append(example)
    return examples


def assert_same_batch(ours, theirs):
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            assert ours[key].shape == value.shape, key
            assert torch.equal(ours[key], value), key
        else:
            assert type(ours[key]) is type(value) and ours[key] == value, key


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7], [3, 1, 5], [1, 1, 1], [16, 2, 9, 4]])
def test_matches_transformers_flattening_collator(lengths, with_labels):
    examples = random_examples(lengths, with_labels)
    reference = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    assert_same_batch(PaddingFreeCollator()(examples), reference(examples))


def test_matches_transformers_without_flash_attn_kwargs():
    examples = random_examples([4, 2, 6], with_labels=True)
    reference = transformers.DataCollatorWithFlattening(return_position_ids=True)
    assert_same_batch(PaddingFreeCollator(return_flash_attn_kwargs=False)(examples), reference(examples))


def test_layout():
    batch = PaddingFreeCollator()([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert "attention_mask" not in batch


def test_tensor_numpy_inputs_and_mixed_labels():
    examples = [
        {"input_ids": torch.tensor([1, 2, 3], dtype=torch.int32), "labels": torch.tensor([1, -100, 3])},
        {"input_ids": np.array([4, 5])},
        {"input_ids": [6, 7], "labels": None},
    ]
    batch = PaddingFreeCollator()(examples)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == [[-100, -100, 3, -100, 5, -100, 7]]
    assert examples[0]["labels"].tolist() == [1, -100, 3], "the example is not modified"


@pytest.mark.parametrize("multiple, tail", [(8, 3), (5, 0), (1, 0), (16, 11)])
def test_pad_to_multiple_of(multiple, tail):
    batch = PaddingFreeCollator(pad_to_multiple_of=multiple, pad_token_id=2)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    total = 5 + tail
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["input_ids"][0, 5:].tolist() == [2] * tail
    assert batch["labels"][0, 5:].tolist() == [-100] * tail
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1] + list(range(2, 2 + tail))
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5], "the tail is not a sequence"
    assert batch["max_length_q"] == 3


def test_max_tokens_guard_counts_the_padding_tail():
    examples = [{"input_ids": [1] * 6}, {"input_ids": [1] * 3}]
    assert PaddingFreeCollator(max_tokens=9)(examples)["input_ids"].shape == (1, 9)
    with pytest.raises(ValueError, match=r"10 tokens .*max_tokens=9"):
        PaddingFreeCollator(max_tokens=9, pad_to_multiple_of=5)(examples)
    with pytest.raises(ValueError, match=r"9 tokens .*max_tokens=8"):
        PaddingFreeCollator(max_tokens=8)(examples)


@pytest.mark.parametrize("features, error, match", [
    ([], ValueError, "features is empty"),
    ({"input_ids": [1, 2]}, TypeError, "features must be a list"),
    ([[1, 2]], TypeError, r"features\[0\] must be a mapping"),
    ([{"labels": [1]}], ValueError, r"features\[0\] has no 'input_ids'"),
    ([{"input_ids": [1]}, {"input_ids": []}], ValueError, r"features\[1\]\['input_ids'\] is empty"),
    ([{"input_ids": [1, 2], "labels": [1]}], ValueError, r"features\[0\]\['labels'\] has 1 entries but 'input_ids' has 2"),
    ([{"input_ids": [1.5, 2.0]}], TypeError, "integer token ids"),
    ([{"input_ids": [[1, 2]]}], ValueError, "must be 1-D"),
    ([{"input_ids": "hello"}], TypeError, "list or 1-D tensor"),
])
def test_bad_features(features, error, match):
    with pytest.raises(error, match=match):
        PaddingFreeCollator()(features)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"pad_to_multiple_of": 0}, ValueError, "pad_to_multiple_of must be > 0"),
    ({"pad_to_multiple_of": 8.0}, TypeError, "pad_to_multiple_of must be an int"),
    ({"max_tokens": -1}, ValueError, "max_tokens must be > 0"),
    ({"pad_token_id": None}, TypeError, "pad_token_id must be an int"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        PaddingFreeCollator(**kwargs)


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def test_packed_row_gives_the_unpacked_logits_and_loss():
    """model(**batch) as Trainer calls it. Without padfree.patch, transformers' eager attention finds the
    boundaries from the restarting position_ids (only with no cache, hence use_cache=False)."""
    model = tiny_llama().eval()
    examples = [{"input_ids": torch.randint(0, 64, (n,)).tolist()} for n in (5, 3, 7, 2)]
    loader = torch.utils.data.DataLoader(examples, batch_size=4,
                                         collate_fn=PaddingFreeCollator(pad_to_multiple_of=8))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (1, 24)
    token_loss_sum, token_count = 0.0, 0
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        for example, start in zip(examples, batch["cu_seq_lens_q"].tolist()):
            ids = torch.tensor([example["input_ids"]])
            alone = model(input_ids=ids, labels=ids)
            torch.testing.assert_close(packed.logits[0, start:start + ids.shape[1]], alone.logits[0],
                                       atol=1e-5, rtol=1e-4)
            token_loss_sum += alone.loss * (ids.shape[1] - 1)
            token_count += ids.shape[1] - 1
    torch.testing.assert_close(packed.loss, token_loss_sum / token_count, atol=1e-5, rtol=1e-5)


def test_hf_trainer_accepts_the_collator(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    examples = [{"input_ids": torch.randint(0, 64, (n,)).tolist()} for n in (5, 3, 7, 2, 4, 6)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                   data_collator=PaddingFreeCollator())
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
