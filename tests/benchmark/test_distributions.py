import argparse
import math

import numpy as np
import pytest

from padfree.benchmark import distributions


@pytest.mark.parametrize("name", sorted(distributions.DISTRIBUTIONS))
def test_same_seed_same_lengths_other_seed_other_lengths(name):
    first = distributions.builtin_lengths(name, 500, seed=3, max_length=1024)
    assert first == distributions.builtin_lengths(name, 500, seed=3, max_length=1024)
    assert first != distributions.builtin_lengths(name, 500, seed=4, max_length=1024)


@pytest.mark.parametrize("name", sorted(distributions.DISTRIBUTIONS))
def test_documented_median_and_log_spread(name):
    spec = distributions.DISTRIBUTIONS[name]
    lengths = distributions.builtin_lengths(name, 20000, seed=0, max_length=4096)
    assert min(lengths) >= distributions.MIN_LENGTH and max(lengths) <= 4096
    assert np.median(lengths) == pytest.approx(spec.median(4096), rel=0.03)
    assert np.std(np.log(lengths)) == pytest.approx(spec.sigma, rel=0.03)


def test_flan_is_high_variance_with_a_long_tail_and_orcamath_is_not():
    flan = distributions.summary(distributions.builtin_lengths("flan", 20000, 0, 4096))
    orcamath = distributions.summary(distributions.builtin_lengths("orcamath", 20000, 0, 4096))
    assert flan["cv"] > 1.0 and flan["p99"] > 8 * flan["median"]
    assert orcamath["cv"] < 0.35 and orcamath["p99"] < 2.5 * orcamath["median"]
    # log-normal mean = median * exp(sigma^2 / 2)
    assert flan["mean"] == pytest.approx(flan["median"] * math.exp(0.5), rel=0.05)


def test_median_scales_with_max_length():
    short = distributions.builtin_lengths("flan", 5000, 0, 1024)
    long = distributions.builtin_lengths("flan", 5000, 0, 4096)
    assert np.median(long) / np.median(short) == pytest.approx(4, rel=0.02)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="distribution must be one of"):
        distributions.builtin_lengths("alpaca", 10, 0, 1024)
    with pytest.raises(ValueError, match="count"):
        distributions.builtin_lengths("flan", 0, 0, 1024)
    with pytest.raises(ValueError, match="max_length"):
        distributions.builtin_lengths("flan", 10, 0, 4)


def test_lengths_file_truncates_and_rejects_garbage(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("12\n\n5000\n7\n")
    assert distributions.lengths_from_file(path, max_length=1024) == [12, 1024, 7]
    path.write_text("12\nabc\n")
    with pytest.raises(ValueError, match="line 2 is not an integer"):
        distributions.lengths_from_file(path, 1024)
    path.write_text("1\n")
    with pytest.raises(ValueError, match=">= 2"):
        distributions.lengths_from_file(path, 1024)


def test_lengths_from_a_local_jsonl_dataset_and_tokenizer(tmp_path):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a b c"}\n{"text": "a"}\n{"text": "a b c a b c"}\n')
    assert distributions.lengths_from_dataset(data, tmp_path / "tok", "text", max_length=4) == [3, 4]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        distributions.lengths_from_dataset(data, tmp_path / "tok", "prompt", max_length=4)


def test_bench_and_verify_take_lengths_in_one_form(tmp_path):
    from padfree import verify
    from padfree.benchmark import cli as bench_cli

    path = tmp_path / "lengths.txt"
    path.write_text("12\n300\n\n77\n")
    assert distributions.parse_lengths([str(path)], max_length=256) == [12, 256, 77]
    assert distributions.parse_lengths(["12", "300", "77"], max_length=256) == [12, 256, 77]
    assert verify.parse_lengths([str(path)]) == verify.parse_lengths(["12", "300", "77"]) == [12, 300, 77]
    for values in (["12", "x"], ["1"], ["0"]):
        with pytest.raises(ValueError, match="--lengths"):
            distributions.parse_lengths(values)
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    for given in (["--lengths", str(path)], ["--lengths", "12", "300", "77"]):
        config = bench_cli.config_from_args(parser.parse_args([*given, "--max-length", "256"]))
        assert config.lengths == (12, 256, 77)

