"""Example-length distributions for the end-to-end benchmark.

Built-in distributions are log-normal, clipped to `[MIN_LENGTH, max_length]`, drawn with numpy's
PCG64 from a seed, so the same (name, count, seed, max_length) always gives the same lengths.
Their median scales with `max_length`, so a CPU run at max_length 1024 and a GPU run at 4096 see
the same shape.

Where the shapes come from: the IBM study "Enhancing Training Efficiency Using Packing with
Flash Attention" (Kundu et al., arXiv 2407.09105) measured padding vs packing on FLAN (a mixture
of many instruction tasks, from one-line classification prompts to long summarisation and
chain-of-thought examples: a wide, right-skewed length distribution with a long tail) and on
OrcaMath (grade-school math word problems with worked answers: lengths clustered around a few
hundred tokens). The parameters below are an approximation of those reported shapes chosen by
hand, not a fit to the datasets' token counts: `flan` has a log-space standard deviation of 1.0
(coefficient of variation ~1.3, 99th percentile ~10x the median), `orcamath` 0.3 (coefficient of
variation ~0.3). Use `--lengths` or `--dataset` to benchmark on real lengths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_LENGTH = 8


@dataclass(frozen=True)
class LengthDistribution:
    """Log-normal lengths: log(length) ~ Normal(log(median_fraction * max_length), sigma)."""

    name: str
    median_fraction: float
    sigma: float
    description: str

    def median(self, max_length: int) -> float:
        return self.median_fraction * max_length

    def sample(self, count: int, seed: int, max_length: int) -> list[int]:
        """`count` lengths in [MIN_LENGTH, max_length], deterministic for a given seed."""
        _check_count_and_max(count, max_length)
        rng = np.random.Generator(np.random.PCG64(seed))
        raw = rng.lognormal(mean=math.log(self.median(max_length)), sigma=self.sigma, size=count)
        return np.clip(np.rint(raw), MIN_LENGTH, max_length).astype(np.int64).tolist()


DISTRIBUTIONS: dict[str, LengthDistribution] = {
    "flan": LengthDistribution(
        "flan", median_fraction=1 / 16, sigma=1.0,
        description="FLAN-v2-like mixture: high variance, long tail (approximate shape, arXiv 2407.09105)"),
    "orcamath": LengthDistribution(
        "orcamath", median_fraction=1 / 16, sigma=0.3,
        description="OrcaMath-like math word problems: low variance (approximate shape, arXiv 2407.09105)"),
}


def _check_count_and_max(count: int, max_length: int) -> None:
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if max_length < MIN_LENGTH:
        raise ValueError(f"max_length must be >= {MIN_LENGTH}, got {max_length}")


def builtin_lengths(name: str, count: int, seed: int, max_length: int) -> list[int]:
    """Lengths from a built-in distribution by name ("flan" or "orcamath")."""
    if name not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTIONS)}, got {name!r}")
    return DISTRIBUTIONS[name].sample(count, seed, max_length)


def lengths_from_file(path: str | Path, max_length: int) -> list[int]:
    """One positive integer length per line (blank lines ignored); longer ones are truncated."""
    lengths = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"--lengths {path}: line {number} is not an integer: {text!r}") from None
        if value < 2:
            raise ValueError(f"--lengths {path}: line {number}: a length must be >= 2 (one token to "
                             f"predict from another), got {value}")
        lengths.append(min(value, max_length))
    if not lengths:
        raise ValueError(f"--lengths {path}: no lengths in the file")
    return lengths


def parse_lengths(values: list[str], max_length: int = 2**31 - 1, minimum: int = 2) -> list[int]:
    """`--lengths` of `padfree bench` and `padfree verify`: numbers, or one file with a length per
    line; each >= `minimum`, longer ones truncated to `max_length`."""
    if len(values) == 1 and not values[0].lstrip("-").isdigit():
        return lengths_from_file(values[0], max_length)
    try:
        lengths = [int(value) for value in values]
    except ValueError:
        raise ValueError(f"--lengths takes numbers or one file name, got {values}") from None
    if not lengths or any(n < minimum for n in lengths):
        raise ValueError(f"--lengths must all be >= {minimum}, got {lengths}")
    return [min(n, max_length) for n in lengths]


def lengths_from_dataset(path: str | Path, tokenizer_path: str | Path, text_field: str,
                         max_length: int) -> list[int]:
    """Token counts of `text_field` in each line of a local JSONL file, with a local tokenizer.

    Examples shorter than 2 tokens are skipped; longer than `max_length` are truncated.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    lengths = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if text_field not in record:
            raise ValueError(f"--dataset {path}: line {number} has no field {text_field!r} "
                             f"(set --text-field; fields: {sorted(record)})")
        count = len(tokenizer(record[text_field], add_special_tokens=True)["input_ids"])
        if count >= 2:
            lengths.append(min(count, max_length))
    if not lengths:
        raise ValueError(f"--dataset {path}: no example with at least 2 tokens in field {text_field!r}")
    return lengths


def summary(lengths: list[int]) -> dict[str, float]:
    """Mean, median, standard deviation, coefficient of variation, p99 and max of `lengths`."""
    values = np.asarray(lengths, dtype=np.float64)
    mean = float(values.mean())
    std = float(values.std())
    return {"count": int(values.size), "mean": mean, "median": float(np.median(values)), "std": std,
            "cv": std / mean, "p99": float(np.percentile(values, 99)), "max": float(values.max())}
