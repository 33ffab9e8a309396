"""padfree.hf.multi_adapter and mixture_of_adapters on a tiny random Llama with PEFT LoRA adapters.

multi_adapter: three adapters of different rank, alpha and target modules trained in one packed
batch per step equal each adapter trained alone by PEFT's own forward on its own sequences, one by
one (no packing, no padfree): per-adapter losses, every adapter gradient, the weights after two
SGD steps, and an exactly-zero gradient for the adapter no sequence of the second batch uses.
`PadfreeOpCalls` proves the padfree op ran in every adapted layer.

mixture_of_adapters: the patched model equals a plain-PyTorch mixture of PEFT's adapter modules
(logits, router and adapter gradients; token and sequence routers, the latter also packed vs rows);
it trains under HF `Trainer` on packed batches (router only: the adapters stay exactly as they
were), saves through the Trainer, loads back with the same logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import padfree  # noqa: E402
import transformers  # noqa: E402
from padfree.hf import adapters as hf_adapters  # noqa: E402
from padfree.packing import PaddingFreeCollator  # noqa: E402
from tests.numerics import relative_error  # noqa: E402
from tests.hf.test_trainer import PadfreeOpCalls, dataset, train, training_arguments  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)  # test_trainer's dataset() ids
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Different ranks, alphas (so scales 2, 0.5, 1) and target modules.
ADAPTERS = {"math": dict(r=4, lora_alpha=8, target_modules=ALL),
            "code": dict(r=8, lora_alpha=4, target_modules=ALL),
            "chat": dict(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"])}
NAMES = list(ADAPTERS)
ADAPTED_LAYERS = 7 * TINY["num_hidden_layers"]
# mixture_of_adapters runs q/k/v and gate/up of every decoder layer as one shared call each, o/down alone
SHARED_GROUPS = 2 * TINY["num_hidden_layers"]
ALONE_LAYERS = 2 * TINY["num_hidden_layers"]
LR = 0.5


def peft_model(**lora_overrides):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager"))
    model = None
    for name, options in ADAPTERS.items():
        config = LoraConfig(**{**options, **lora_overrides}, init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def examples(lengths_and_adapters, seed):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, TINY["vocab_size"], (n,), generator=generator).tolist(), "adapter_id": a}
            for n, a in lengths_and_adapters]


# The second batch uses no sequence of adapter 1 ("code").
BATCHES = [examples([(5, 0), (3, 2), (7, 1), (4, 0), (6, 1)], seed=1), examples([(6, 2), (4, 0), (5, 2)], seed=2)]


def assert_same(name, x, reference, rtol=1e-4):
    """float32 in another summation order (packed vs one by one, varlen vs eager attention, stacked vs
    per-adapter LoRA): measured up to 1.5e-5 relative on a gradient; a wrong scale or adapter is O(1)."""
    error = relative_error(x, reference)
    assert error <= rtol, f"{name}: relative error {error:.2e}"


def adapter_parameters(model, name):
    return {n: p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n}


def sequence_losses(logits, labels, lengths):
    """Summed next-token cross-entropy of every packed sequence (labels hold -100 at sequence starts)."""
    tokens = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="none")
    tokens = torch.cat([tokens, tokens.new_zeros(1)])  # the last token predicts nothing
    # the loss of token t is the prediction of label t + 1: it belongs to the sequence of t + 1
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    owner = torch.cat([owner[1:], owner.new_zeros(1)])
    return torch.zeros(len(lengths)).index_add(0, owner, tokens)


def alone_step(model, name, batch):
    """PEFT alone: adapter `name` active, its sequences one by one; (summed loss, its gradients)."""
    model.set_adapter(name)
    model.zero_grad(set_to_none=True)
    total = 0
    for example in batch:
        if NAMES[example["adapter_id"]] == name:
            ids = torch.tensor(example["input_ids"])[None]
            logits = model(input_ids=ids).logits
            total = total + torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in adapter_parameters(model, name).items()}


def test_multi_adapter_packed_training_equals_each_adapter_alone(backend):
    reference = peft_model()
    model = hf_adapters.multi_adapter(copy.deepcopy(reference), NAMES)
    padfree.patch(model, attention=True, lora=False, moe=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for name in NAMES for p in adapter_parameters(model, name).values()}
    optimizer = torch.optim.SGD(trainable, lr=LR)
    collate = PaddingFreeCollator(adapter_key="adapter_id")
    for step, batch in enumerate(BATCHES):
        packed = collate(batch)
        lengths = [len(e["input_ids"]) for e in batch]
        optimizer.zero_grad(set_to_none=True)
        calls = PadfreeOpCalls()
        with calls:
            logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
            losses = sequence_losses(logits, packed["labels"], lengths)
            losses.sum().backward()
        assert calls.calls["lora_mixture_fwd"] == calls.calls["lora_mixture_bwd"] == ADAPTED_LAYERS
        assert calls.calls["varlen_attention_fwd"] == TINY["num_hidden_layers"]

        used = {NAMES[e["adapter_id"]] for e in batch}
        for name in NAMES:
            grads = {n: p.grad for n, p in adapter_parameters(model, name).items()}
            if name not in used:
                assert step == 1 and all(g is not None and not g.any() for g in grads.values()), name
                continue
            loss, reference_grads = alone_step(reference, name, batch)
            mine = sum(losses[i] for i, e in enumerate(batch) if NAMES[e["adapter_id"]] == name)
            torch.testing.assert_close(mine, loss, rtol=1e-5, atol=1e-5)
            assert grads.keys() == reference_grads.keys() and grads
            for n, g in grads.items():
                assert_same(n, g, reference_grads[n])
            with torch.no_grad():
                for n, p in adapter_parameters(reference, name).items():
                    p -= LR * reference_grads[n]
        optimizer.step()
    for name in NAMES:
        trained, alone = adapter_parameters(model, name), adapter_parameters(reference, name)
        for n, p in trained.items():
            assert_same(n, p, alone[n])


def test_multi_adapter_trains_under_trainer_each_adapter_from_its_own_sequences(tmp_path):
    """HF `Trainer` (plain list dataset, `remove_unused_columns=False`) with the adapter collator:
    two SGD steps over a batch of "math" and "code" sequences equal PEFT training each adapter alone
    on its own sequences (the Trainer's loss is the batch's mean over label tokens, so each
    adapter's update is lr / tokens x its summed-loss gradient), and "chat", which no sequence
    uses, stays bit for bit as it was."""
    reference = peft_model()
    model = hf_adapters.multi_adapter(copy.deepcopy(reference), NAMES)
    padfree.patch(model, attention=True, lora=False, moe=False)
    initial = {n: p.detach().clone() for name in NAMES for n, p in adapter_parameters(model, name).items()}
    train_set = examples([(5, 0), (7, 1), (4, 0), (6, 1)], seed=3)
    collate = PaddingFreeCollator(adapter_key="adapter_id")
    batches = []

    def recording(features):
        batches.append(features)
        return collate(features)

    # by default Trainer drops the example keys the model's forward does not name: a clear error
    args = training_arguments(tmp_path, per_device_train_batch_size=len(train_set), gradient_accumulation_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
    args = training_arguments(tmp_path, per_device_train_batch_size=len(train_set), gradient_accumulation_steps=1,
                              remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, data_collator=recording)
    losses, trained, calls = train(trainer)
    assert len(batches) == 2 and all(len(b) == len(train_set) for b in batches)
    assert calls.calls["lora_mixture_fwd"] == calls.calls["lora_mixture_bwd"] == ADAPTED_LAYERS * 2

    for step, batch in enumerate(batches):
        tokens = sum(len(e["input_ids"]) - 1 for e in batch)
        total = 0.0
        for name in ("math", "code"):
            loss, grads = alone_step(reference, name, batch)
            total += loss.item()
            with torch.no_grad():
                for n, p in adapter_parameters(reference, name).items():
                    p -= args.learning_rate / tokens * grads[n]
        assert abs(losses[step] - total / tokens) <= 1e-4 * abs(losses[step]), (step, losses[step], total / tokens)
    for name in ("math", "code"):
        alone = adapter_parameters(reference, name)
        for n in alone:
            assert_same(n, trained[n] - initial[n], alone[n].detach() - initial[n])
    for n in adapter_parameters(model, "chat"):
        assert torch.equal(trained[n], initial[n]), n


def logits_alone(reference, batch):
    """Each sequence alone through PEFT's forward with its adapter active."""
    outputs = []
    for example in batch:
        reference.set_adapter(NAMES[example["adapter_id"]])
        outputs.append(reference(input_ids=torch.tensor(example["input_ids"])[None]).logits[0])
    return outputs


@torch.no_grad()
def test_multi_adapter_sequences_from_cu_seq_lens_position_ids_or_rows():
    reference = peft_model()
    model = hf_adapters.multi_adapter(copy.deepcopy(reference), NAMES)
    padfree.patch(model, attention=True, lora=True, moe=False, strict=False)  # lora=True must leave them alone
    batch = examples([(4, 1), (2, 0), (5, 2)], seed=3)
    expected = logits_alone(reference, batch)
    lengths = [len(e["input_ids"]) for e in batch]
    for flash_kwargs in (True, False):  # boundaries from cu_seq_lens_q, or from where position_ids restart
        packed = PaddingFreeCollator(return_flash_attn_kwargs=flash_kwargs, adapter_key="adapter_id")(batch)
        calls = PadfreeOpCalls()
        with calls:
            logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        assert calls.calls["lora_mixture_fwd"] == ADAPTED_LAYERS and calls.calls["lora_linear_fwd"] == 0
        for got, want in zip(logits.split(lengths), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([batch[0]["input_ids"][:2], batch[1]["input_ids"]])  # a plain (2, 2) batch, one per row
    logits = model(input_ids=rows, adapter_ids=torch.tensor([1, 0])).logits
    torch.testing.assert_close(logits[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], logits_alone(reference, [{"input_ids": rows[0].tolist(),
                                                                     "adapter_id": 1}])[0], rtol=1e-5, atol=1e-5)


def test_multi_adapter_errors_and_unpatch():
    model = peft_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    forwards = {n: m.forward for n, m in model.named_modules() if "lora" in type(m).__module__}
    hf_adapters.multi_adapter(model, NAMES)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="needs adapter_ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"adapter 3, outside 0..2"):
        model(input_ids=ids, adapter_ids=torch.tensor([3]))
    with pytest.raises(ValueError, match="adapter_ids has 2 entries but the batch has no cu_seq_lens_q .* has 1 seq"):
        model(input_ids=ids, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="position_ids hold 2 sequences"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1]]), adapter_ids=torch.tensor([0]))
    with pytest.raises(TypeError, match="adapter_ids must be a 1-D int32/int64 tensor"):
        model(input_ids=ids, adapter_ids=torch.tensor([0.0]))
    with model.disable_adapter():  # PEFT's switch still gives the base model, adapter_ids or not
        model(input_ids=ids)
    hf_adapters.unpatch_adapters(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.forward for n, m in model.named_modules() if "lora" in type(m).__module__} == forwards
    assert model.base_model.active_adapters == [NAMES[0]]
    model(input_ids=ids)  # PEFT's own forward again

    with pytest.raises(ValueError, match="neither an adapter loaded in the model"):
        hf_adapters.multi_adapter(model, ["math", "missing"])
    with pytest.raises(ValueError, match=r"'math' is neither an adapter loaded in the model \(loaded: \[\]\)"):
        hf_adapters.multi_adapter(LlamaForCausalLM(LlamaConfig(**TINY)), ["math"])  # no LoRA adapters at all
    model.add_adapter("embed", LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match=r"embed_tokens: Embedding is not a LoRA Linear layer"):
        hf_adapters.multi_adapter(model, ["math", "embed"])
    dora = peft_model(use_dora=True)
    with pytest.raises(ValueError, match="is a LoRA variant"):
        hf_adapters.multi_adapter(dora, NAMES)


def test_collator_adapter_ids():
    collate = PaddingFreeCollator(adapter_key="adapter_id", pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7], "adapter_id": 2}, {"input_ids": [8], "adapter_id": torch.tensor(1)}])
    assert batch["adapter_ids"].tolist() == [2, 1] and batch["adapter_ids"].dtype == torch.int64
    assert "adapter_ids" not in PaddingFreeCollator()([{"input_ids": [5], "adapter_id": 0}])
    with pytest.raises(ValueError, match=r"features\[1\] has no 'adapter_id'"):
        collate([{"input_ids": [5], "adapter_id": 0}, {"input_ids": [6]}])
    with pytest.raises(TypeError, match="must be an int adapter index"):
        collate([{"input_ids": [5], "adapter_id": "math"}])


@torch.no_grad()
def test_multi_adapter_loads_adapters_from_paths(tmp_path):
    model = peft_model()
    model.save_pretrained(tmp_path)  # non-default adapters go to tmp_path/<name>
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager"))
    loaded = hf_adapters.multi_adapter(base, [tmp_path / "code", str(tmp_path / "math")])
    assert list(loaded.peft_config) == ["code", "math"]
    hf_adapters.multi_adapter(model, ["code", "math"])
    batch = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                 adapter_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def oracle_mixture_forward(module, names, top_k, router):
    """The mixture in plain PyTorch from PEFT's own modules: softmax top-k of the router, renormalised;
    a sequence router scores the mean over a row (x is (batch, seq_len, in), one sequence per row)."""
    def forward(x):
        result = module.base_layer(x)
        scored = x if router == "token" else x.mean(dim=1, keepdim=True)
        probs = module.padfree_router(scored).float().softmax(-1)
        weights, index = probs.topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        for expert, name in enumerate(names):
            if name in module.lora_A:
                gate = (weights * (index == expert)).sum(-1, keepdim=True)
                result = result + gate * module.lora_B[name](module.lora_A[name](x)) * module.scaling[name]
        return result

    return forward


def assert_mixture_calls(calls, forwards, backwards=None):
    """The padfree op calls of `forwards` forward (and `backwards`, default as many, backward) passes of
    a mixture model: a router per adapted layer, the groups' shared op, the op of the others."""
    backwards = forwards if backwards is None else backwards
    got = {name: calls[name] for name in ("moe_route_fwd", "lora_mixture_shared_fwd", "lora_mixture_fwd",
                                          "lora_mixture_shared_bwd", "lora_mixture_bwd")}
    assert got == {"moe_route_fwd": ADAPTED_LAYERS * forwards, "lora_mixture_shared_fwd": SHARED_GROUPS * forwards,
                   "lora_mixture_fwd": ALONE_LAYERS * forwards, "lora_mixture_shared_bwd": SHARED_GROUPS * backwards,
                   "lora_mixture_bwd": ALONE_LAYERS * backwards}


def mixture(trainable="all", top_k=2, router="token"):
    model = peft_model()
    torch.manual_seed(1)  # the routers' init
    return hf_adapters.mixture_of_adapters(model, NAMES, top_k=top_k, router=router, trainable=trainable)


@pytest.mark.parametrize("router", ["token", "sequence"])
def test_mixture_equals_plain_pytorch_mixture_of_peft_adapters(backend, router):
    model, oracle = mixture(router=router), mixture(router=router)
    for name, module in oracle.named_modules():
        if hasattr(module, "padfree_router"):
            module.forward = oracle_mixture_forward(module, NAMES, top_k=2, router=router)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4))
    results = []
    for m in (model, oracle):
        calls = PadfreeOpCalls()
        with calls:
            out = m(input_ids=input_ids, labels=input_ids)
            out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, calls.calls))
    (logits, grads, calls), (oracle_logits, oracle_grads, oracle_calls) = results
    assert_mixture_calls(calls, 1)
    assert "lora_mixture_fwd" not in oracle_calls and "lora_mixture_shared_fwd" not in oracle_calls
    torch.testing.assert_close(logits, oracle_logits, rtol=1e-5, atol=1e-5)
    routers = [n for n in grads if "padfree_router" in n]
    assert len(routers) == ADAPTED_LAYERS and len(grads) > len(routers) and grads.keys() == oracle_grads.keys()
    for n, g in grads.items():
        # with a sequence router, an adapter no sequence chose in a layer has a zero gradient there
        assert g.any() or (router == "sequence" and n not in routers), n
        assert_same(n, g, oracle_grads[n])
    assert sum(bool(g.any()) for g in grads.values()) > len(routers)


def test_mixture_groups_qkv_and_gate_up_as_the_ungrouped_layers(backend, monkeypatch):
    """q/k/v and gate/up run as one lora_mixture_linear_shared call per group (each member with its
    own router), with the logits and gradients of every layer run alone (grouping switched off).
    (test_mixture_equals_plain_pytorch_mixture_of_peft_adapters holds the groups to the plain
    PyTorch mixture with both routers.)"""
    model = mixture()
    with monkeypatch.context() as patched:
        patched.setattr(hf_adapters, "find_groups", lambda layers, key: [])
        alone = mixture()
    shared_calls = []
    original = hf_adapters.lora_mixture_linear_shared

    def spy(x, weights, *args, **kwargs):
        shared_calls.append(len(weights))
        return original(x, weights, *args, **kwargs)

    monkeypatch.setattr(hf_adapters, "lora_mixture_linear_shared", spy)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(6))
    results = []
    for m in (model, alone):
        shared_calls.clear()
        calls = PadfreeOpCalls()
        with calls:
            out = m(input_ids=input_ids, labels=input_ids)
            out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, calls.calls,
                        list(shared_calls)))
    (logits, grads, calls, spied), (alone_logits, alone_grads, alone_calls, alone_spied) = results
    assert spied == [3, 2] * TINY["num_hidden_layers"] and alone_spied == []
    assert_mixture_calls(calls, 1)
    assert alone_calls["lora_mixture_fwd"] == ADAPTED_LAYERS and "lora_mixture_shared_fwd" not in alone_calls
    torch.testing.assert_close(logits, alone_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == alone_grads.keys() and len(grads) > ADAPTED_LAYERS
    for n, g in grads.items():
        assert_same(n, g, alone_grads[n])


def test_mixture_trains_router_only_under_trainer_saves_and_reloads(tmp_path):
    model = mixture(trainable="router")
    padfree.patch(model, attention=True, lora=False, moe=False)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in initial if "padfree_router" in n}
    args = training_arguments(tmp_path / "run", learning_rate=1.0, gradient_accumulation_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), data_collator=PaddingFreeCollator())
    losses, trained, calls = train(trainer)
    # two optimizer steps of one micro-batch each
    assert_mixture_calls(calls.calls, 2)
    assert calls.calls["varlen_attention_fwd"] == TINY["num_hidden_layers"] * 2
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for n, start in initial.items():
        moved = not torch.equal(trained[n], start)
        assert moved == ("padfree_router" in n), f"{n} {'moved' if moved else 'did not move'}"

    trainer.save_model(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"math", "code", "chat", hf_adapters.ROUTER_WEIGHTS,
                                                                hf_adapters.MIXTURE_CONFIG}
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="eager"))
    loaded = hf_adapters.load_mixture_of_adapters(base, tmp_path / "saved")
    padfree.patch(loaded, attention=True, lora=False, moe=False)
    batch = PaddingFreeCollator()(dataset()[:3])
    with torch.no_grad():
        model.eval()
        loaded.eval()
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    hf_adapters.unpatch_adapters(model)
    assert not hf_adapters.routers(model) and "save_pretrained" not in model.__dict__
    calls = PadfreeOpCalls()
    with calls, torch.no_grad():
        model(**batch)
    assert "lora_mixture_fwd" not in calls.calls and "lora_mixture_shared_fwd" not in calls.calls


def test_mixture_errors():
    model = peft_model()
    with pytest.raises(ValueError, match="router must be 'token' .* or 'sequence'"):
        hf_adapters.mixture_of_adapters(model, NAMES, router="batch")
    with pytest.raises(ValueError, match="trainable must be 'router'"):
        hf_adapters.mixture_of_adapters(model, NAMES, trainable="adapters")
    with pytest.raises(ValueError, match="top_k=4 is more than the 3 adapters"):
        hf_adapters.mixture_of_adapters(model, NAMES, top_k=4)
    with pytest.raises(ValueError, match="holds no saved mixture of adapters"):
        hf_adapters.load_mixture_of_adapters(model, ".")

    hf_adapters.multi_adapter(model, NAMES)
    hf_adapters.mixture_of_adapters(model, NAMES[:2], top_k=1)  # replaces the multi-adapter patch
    calls = PadfreeOpCalls()
    with calls, torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))  # no adapter_ids needed any more
    assert_mixture_calls(calls.calls, 1, 0)
    assert len(hf_adapters.routers(model)) == ADAPTED_LAYERS


@torch.no_grad()
def test_sequence_router_routes_packed_sequences_as_rows():
    """A packed row of two sequences (boundaries from cu_seq_lens_q, padding tail after them) gives
    each sequence the logits it gets as one row of a plain batch: the routing is per sequence."""
    model = mixture(router="sequence")
    padfree.patch(model, attention=True, lora=False, moe=False)
    rows = torch.randint(3, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(5))
    packed = PaddingFreeCollator(pad_to_multiple_of=16)([{"input_ids": r.tolist()} for r in rows])
    calls = PadfreeOpCalls()
    with calls:
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
    assert_mixture_calls(calls.calls, 1, 0)
    torch.testing.assert_close(logits[:12].view(2, 6, -1), model(input_ids=rows).logits, rtol=1e-5, atol=1e-5)


def test_multi_adapter_refuses_layers_padfree_patch_replaced_first():
    """padfree.patch(lora=True) before multi_adapter would later restore PEFT's forward over
    multi_adapter's: refused with the order that works, and that order works."""
    model = peft_model()
    padfree.patch(model, attention=False, lora=True, moe=False)
    with pytest.raises(ValueError, match=r"already replaced .* call padfree.unpatch\(model\) first"):
        hf_adapters.multi_adapter(model, NAMES)
    padfree.unpatch(model)
    hf_adapters.multi_adapter(model, NAMES)
    ours = {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}
    assert ours
    padfree.patch(model, attention=False, lora=True, moe=False, strict=False)
    padfree.unpatch(model)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules() if n in ours} == ours
    hf_adapters.unpatch_adapters(model)
