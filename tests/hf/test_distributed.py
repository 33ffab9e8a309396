"""Data parallel on CPU: 2 processes (gloo, DDP) train a padfree-patched tiny model on packs from
`MultipackBatchSampler`. Every example is used once, the ranks get near-equal tokens each step, the
losses and final weights equal one process training on the same packs, and every rank ran padfree's
attention in every layer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import padfree
from padfree import verify
from padfree.hf.models import ARCHITECTURES
from padfree.packing import MultipackBatchSampler, PaddingFreeCollator
from tests.hf.test_trainer import PadfreeOpCalls, attention_calls

WORLD = 2
LENGTHS = torch.randint(1, 17, (40,), generator=torch.Generator().manual_seed(0)).tolist()
TOKENS_PER_RANK = 48
LEARNING_RATE = 0.5


def dataset():
    generator = torch.Generator().manual_seed(1234)
    return [{"input_ids": s.tolist()} for s in verify.random_sequences(LENGTHS, 128, generator)]


def fresh_model():
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"].build_model()
    padfree.patch(model, attention=True, lora=False, moe=False)
    return model


def summed_loss(model, batch):
    """Sum of next-token losses of one packed row, and how many tokens it predicts."""
    out = model(**{key: value for key, value in batch.items() if key != "labels"})
    targets = batch["labels"][0, 1:]
    loss = F.cross_entropy(out.logits[0, :-1], targets, ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def train_on_rank(model, optimizer, rank) -> tuple[list[dict], dict]:
    """This rank's packs from `MultipackBatchSampler`, one optimizer step each, on padfree's
    reference backend; returns the steps (indices, tokens, global loss) and padfree's op calls.
    The wrapper (DDP, FSDP) averages gradients over ranks, so the loss is scaled to make that the
    mean over all ranks' tokens."""
    examples, collate = dataset(), PaddingFreeCollator()
    sampler = MultipackBatchSampler(LENGTHS, TOKENS_PER_RANK, num_replicas=WORLD, rank=rank, seed=0)
    steps, counter = [], PadfreeOpCalls()
    with padfree.use_backend("reference"), counter:
        for indices in sampler:
            loss_sum, count = summed_loss(model, collate([examples[i] for i in indices]))
            total = count.clone()
            dist.all_reduce(total)
            (loss_sum * WORLD / total).backward()
            optimizer.step()
            optimizer.zero_grad()
            global_loss = loss_sum.detach() / total
            dist.all_reduce(global_loss)
            steps.append({"indices": indices, "tokens": sum(LENGTHS[i] for i in indices),
                          "loss": global_loss.item()})
    return steps, counter.calls


def train_one_process(model, optimizer, plan) -> list[float]:
    """One process, the same packs: each step's loss is the mean over both ranks' tokens."""
    examples, collate = dataset(), PaddingFreeCollator()
    losses = []
    with padfree.use_backend("reference"):
        for step in plan:
            parts = [summed_loss(model, collate([examples[i] for i in pack])) for pack in step]
            total = sum(count for _, count in parts)
            loss = sum(loss_sum for loss_sum, _ in parts) / total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


def _rank_main(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = torch.nn.parallel.DistributedDataParallel(fresh_model())
    steps, calls = train_on_rank(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), rank)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(steps, f)
    with open(f"{out_dir}/calls{rank}.json", "w") as f:
        json.dump(calls, f)
    if rank == 0:
        torch.save(model.module.state_dict(), f"{out_dir}/weights.pt")
    dist.destroy_process_group()


def single_process(plan):
    model = fresh_model()
    losses = train_one_process(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), plan)
    return losses, model.state_dict()


def test_two_process_ddp_with_multipack_equals_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert len(ranks[0]) == len(ranks[1]) >= 2
    seen = sorted(i for rank in ranks for step in rank for i in step["indices"])
    assert seen == list(range(len(LENGTHS)))  # nothing lost, nothing twice
    tokens = [[step["tokens"] for step in rank] for rank in ranks]
    sampler = MultipackBatchSampler(LENGTHS, TOKENS_PER_RANK, num_replicas=WORLD, rank=0, seed=0)
    assert [list(step) for step in zip(*tokens)] == sampler.stats()["tokens_per_rank_step"]
    assert max(max(t) for t in tokens) <= TOKENS_PER_RANK
    # Balanced: the ranks' epoch totals differ by less than one step's budget, and over all steps the
    # busiest rank is kept at least 85% busy on average (each step waits for its slowest rank).
    assert abs(sum(tokens[0]) - sum(tokens[1])) < TOKENS_PER_RANK
    assert sum(LENGTHS) / (WORLD * sum(max(pair) for pair in zip(*tokens))) >= 0.85
    for r0, r1 in zip(*ranks):
        assert r0["loss"] == pytest.approx(r1["loss"], rel=1e-6)  # both hold the all-reduced loss
    layers = ARCHITECTURES["llama"].build_config().num_hidden_layers
    for r in range(WORLD):  # one forward and one backward per step
        assert json.loads((tmp_path / f"calls{r}.json").read_text()) == attention_calls(layers, len(ranks[0]))

    plan = [[r0["indices"], r1["indices"]] for r0, r1 in zip(*ranks)]
    losses, weights = single_process(plan)
    torch.testing.assert_close(torch.tensor([s["loss"] for s in ranks[0]]), torch.tensor(losses),
                               rtol=1e-5, atol=0)
    distributed = torch.load(tmp_path / "weights.pt")
    for name, weight in weights.items():
        torch.testing.assert_close(distributed[name], weight, rtol=1e-5, atol=1e-6, msg=name)
