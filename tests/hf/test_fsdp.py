"""FSDP2 on CPU: 2 processes (gloo) train a padfree-patched tiny Llama with a PEFT LoRA adapter,
each decoder layer and the whole model sharded with `torch.distributed.fsdp.fully_shard`, on packs
from `MultipackBatchSampler`. The losses and the trained LoRA weights equal one process training on
the same packs, and padfree's attention and fused LoRA ops ran on every rank.

Sharding only changes where the parameters live between forwards: FSDP2 all-gathers a layer's
parameters into plain tensors before its forward, so the patched LoRA layers and padfree's attention
see the same tensors as in one process, and reduce-scatters (averages) the gradients after the
backward.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import padfree
from padfree.hf.models import ARCHITECTURES
from tests.hf.test_distributed import LEARNING_RATE, WORLD, train_on_rank, train_one_process
from tests.hf.test_trainer import LORA_CALLS_PER_LAYER, LORA_TARGETS, attention_calls

peft = pytest.importorskip("peft")
fsdp = pytest.importorskip("torch.distributed.fsdp")

pytestmark = pytest.mark.slow  # two processes that each import transformers and peft, then train

LORA = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
LAYERS = ARCHITECTURES["llama"].build_config().num_hidden_layers


def fresh_model():
    """The same random tiny Llama with the same LoRA adapter (B random, not 0) in every process, patched."""
    torch.manual_seed(0)
    model = peft.get_peft_model(ARCHITECTURES["llama"].build_model(), peft.LoraConfig(**LORA))
    report = padfree.patch(model)
    assert report.patched("attention") and report.patched("lora") and not report.skipped("lora")
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _rank_main(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = fresh_model()
    for layer in model.base_model.model.model.layers:
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded, not replicated
    steps, calls = train_on_rank(model, torch.optim.SGD(trainable(model), lr=LEARNING_RATE), rank)
    full = {name: value.full_tensor() for name, value in model.state_dict().items()}  # collective: every rank
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"steps": steps, "calls": calls}, f)
    if rank == 0:
        torch.save(full, f"{out_dir}/weights.pt")
    dist.destroy_process_group()


def single_process(plan):
    model = fresh_model()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    losses = train_one_process(model, torch.optim.SGD(trainable(model), lr=LEARNING_RATE), plan)
    return losses, initial, model.state_dict()


def test_two_process_fsdp2_lora_equals_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    steps = [rank["steps"] for rank in ranks]
    assert len(steps[0]) == len(steps[1]) >= 2
    lora_calls = LORA_CALLS_PER_LAYER * LAYERS * len(steps[0])
    for rank in ranks:  # one forward and one backward per step, every layer on padfree
        assert rank["calls"] == {**attention_calls(LAYERS, len(steps[0])), "lora_linear_fwd": lora_calls,
                                 "lora_linear_bwd": lora_calls}

    plan = [[r0["indices"], r1["indices"]] for r0, r1 in zip(*steps)]
    losses, initial, weights = single_process(plan)
    torch.testing.assert_close(torch.tensor([s["loss"] for s in steps[0]]), torch.tensor(losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor([s["loss"] for s in steps[1]]), torch.tensor(losses), rtol=1e-5, atol=0)
    distributed = torch.load(tmp_path / "weights.pt")
    assert distributed.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(distributed[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        changed = not torch.equal(weight, initial[name])
        assert changed == ("lora_" in name), f"{name}: {'changed' if changed else 'did not change'}"
