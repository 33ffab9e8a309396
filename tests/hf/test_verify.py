"""`padfree verify`: the table it prints and its exit code."""

from __future__ import annotations

import json

import pytest
import torch

from padfree import cli, verify


def test_verify_passes_on_a_tiny_model(capsys):
    assert cli.main(["verify", "--model-type", "gemma2", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "padfree verify: gemma2 (Gemma2ForCausalLM" in out
    assert "check" in out and "max abs err" in out and "rel err" in out and "tol" in out
    for check in ("packed vs one by one: logits", "packed vs padded: loss", "padded padfree vs eager: grads"):
        assert check in out
    assert "FAIL" not in out and "all 9 checks passed" in out


def test_verify_fails_with_exit_code_1_when_a_check_fails(capsys):
    assert cli.main(["verify", "--model-type", "llama", "--backend", "reference", "--rtol", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "checks failed" in out


def test_verify_triton_backend_per_parameter(capsys, triton_cpu):
    assert cli.main(["verify", "--model-type", "olmo2", "--backend", "triton", "--lengths", "4", "9",
                     "--per-parameter"]) == 0
    out = capsys.readouterr().out
    assert "backend triton" in out and "grad model.layers.1.self_attn.q_proj.weight" in out


def test_verify_from_a_config_file_shrinks_it(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    vocab_size=32000, sliding_window=3)))
    assert cli.main(["verify", "--config", str(path), "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "padfree verify: mistral" in out and "all 9 checks passed" in out


def test_verify_rejects_a_config_it_cannot_serve(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="bloom")))
    assert cli.main(["verify", "--config", str(path), "--backend", "reference"]) == 2
    assert "does not declare flash-attention support" in capsys.readouterr().err


def test_verify_any_causal_lm_type_from_its_default_config(capsys):
    assert cli.main(["verify", "--model-type", "smollm3", "--backend", "reference", "--lengths", "4", "7"]) == 0
    assert "padfree verify: smollm3 (SmolLM3ForCausalLM" in capsys.readouterr().out
    assert cli.main(["verify", "--model-type", "no_such_type"]) == 2
    assert "'no_such_type' is not a causal-LM type" in capsys.readouterr().err


def test_verify_takes_lengths_from_a_file_like_bench(tmp_path, capsys):
    path = tmp_path / "lengths.txt"
    path.write_text("4\n\n9\n3\n")
    assert cli.main(["verify", "--model-type", "llama", "--backend", "reference", "--lengths", str(path)]) == 0
    assert "lengths [4, 9, 3]" in capsys.readouterr().out
    assert cli.main(["verify", "--model-type", "llama", "--lengths", "4", "x"]) == 2
    assert "--lengths takes numbers or one file name" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_verify_on_cuda_without_cuda_is_a_clear_error(capsys):
    assert cli.main(["verify", "--model-type", "llama", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:" in err and "use --device cpu" in err and "Traceback" not in err


# The CI subset of the sweep: a plain and a feature-rich served type, a state-space hybrid, a
# BART-family decoder, a RoBERTa-family type and a type without flash-attention support.
SWEEP_SUBSET = {"llama": "served, proven", "gemma2": "served, proven", "bamba": "refused", "bart": "refused",
                "roberta": "refused", "bloom": "refused"}


def test_sweep_subset():
    types = {t: c for t, c in verify.causal_lm_types().items() if t in SWEEP_SUBSET}
    lines = []
    rows = verify.sweep(types, progress=lines.append)
    assert {r.model_type: r.status for r in rows} == SWEEP_SUBSET
    assert len(lines) == len(SWEEP_SUBSET) and lines[0].startswith("[1/6] bamba: refused (")
    by_type = {r.model_type: r for r in rows}
    assert "sliding window" in by_type["gemma2"].detail and "softcap" in by_type["gemma2"].detail
    assert "linear_attention" in by_type["bamba"].detail
    assert "takes no position_ids" in by_type["bart"].detail
    assert not any(r.failed for r in rows)
    table = verify.sweep_table(rows)
    assert "| gemma2 | Gemma2ForCausalLM | yes | served, proven |" in table
    assert "| bloom | BloomForCausalLM | no | refused |" in table


def test_sweep_fails_a_type_served_wrong(monkeypatch):
    """Were BART's decoder served, its positions would not restart per sequence: the sweep must
    say SERVED WRONG and count it as a failure, not pass it."""
    from padfree.hf import models

    monkeypatch.setattr(models, "refusal", lambda model: None)
    (row,) = verify.sweep({"bart": "BartForCausalLM"}, progress=lambda line: None)
    assert row.status == verify.WRONG and row.failed
    assert "packed vs one by one" in row.detail


@pytest.mark.slow
def test_sweep_more_types():
    expected = {"qwen3": "served, proven", "gpt2": "served, proven", "exaone4": "served, proven",
                "mixtral": "served, proven", "gpt_neox": "served, proven", "qwen3_next": "refused",
                "jamba": "refused", "lfm2": "refused", "xlm-roberta": "refused", "mbart": "refused"}
    types = {t: c for t, c in verify.causal_lm_types().items() if t in expected}
    rows = verify.sweep(types, progress=lambda line: None)
    assert {r.model_type: r.status for r in rows} == expected


def test_verify_needs_a_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify"])
    assert "--model-type" in capsys.readouterr().err


def test_tiny_config_fills_what_the_default_configs_leave_out():
    """Sub-config overrides merge into the shrunk sub-config (DBRX's attention config gets the
    rope_theta / clip_qkv its attention reads); a sub-config's layer types shrink with its layers;
    Dory's sections fit the two tiny layers."""
    from padfree.hf import models

    dbrx = models.tiny_config("dbrx")
    assert (dbrx.attn_config.rope_theta, dbrx.attn_config.clip_qkv) == (1e4, 8.0)
    moss = models.tiny_config("moss_transcribe_diarize").text_config
    assert moss.num_hidden_layers == len(moss.layer_types) == 2 and moss.hidden_size == 64
    merged = models.tiny_config("moss_transcribe_diarize", text_config=dict(num_attention_heads=2)).text_config
    assert (merged.num_attention_heads, merged.hidden_size, merged.num_hidden_layers) == (2, 64, 2)
    dory = models.tiny_config("dory")
    assert dory.n_input_layers + dory.n_recurrent_layers + dory.n_output_layers == dory.num_hidden_layers == 2
    compass = models.tiny_config("cohere_compass_text")
    assert set(compass.rope_parameters) == {"sliding_attention", "full_attention"}


def test_sequence_mixers_of_other_modalities_do_not_refuse_but_on_the_text_path_they_do():
    """Phi-4 multimodal's audio encoder has a depthwise conv over audio frames, never run on the
    packed token row: not a refusal. The same conv on the text model is one."""
    import transformers

    from padfree.hf import models

    model = transformers.Phi4MultimodalForCausalLM(models.tiny_config("phi4_multimodal"))
    assert any(isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1 for m in model.modules())
    assert models.refusal(model) is None
    model.model.layers[0].mixer = torch.nn.Conv1d(64, 64, 3, groups=64)
    assert "a convolution over the sequence (model.layers.0.mixer, kernel 3)" in models.refusal(model)


def test_position_ids_through_typed_kwargs_to_the_text_decoder():
    """MossTranscribeDiarize passes TransformersKwargs (position_ids among them) to its Qwen3
    language model: served. WhisperForCausalLM's untyped **kwargs pass nothing on: refused."""
    import transformers

    from padfree.hf import models

    moss = transformers.MossTranscribeDiarizeForConditionalGeneration(models.tiny_config("moss_transcribe_diarize"))
    assert models.refusal(moss) is None
    whisper = transformers.WhisperForCausalLM(models.tiny_config("whisper", transformers.WhisperConfig))
    assert "WhisperForCausalLM.forward takes no position_ids" in models.refusal(whisper)


@pytest.mark.slow
def test_sweep_serves_the_types_tiny_configs_and_text_path_checks_opened():
    expected = {"dbrx": "served, proven", "cohere_compass_text": "served, proven", "dory": "served, proven",
                "phi4_multimodal": "served, proven", "moss_transcribe_diarize": "served, proven",
                "whisper": "refused", "gemma4_assistant": "refused"}
    types = {t: c for t, c in verify.causal_lm_types().items() if t in expected}
    rows = verify.sweep(types, progress=lambda line: None)
    assert {r.model_type: r.status for r in rows} == expected
    assert "draft model" in next(r for r in rows if r.model_type == "gemma4_assistant").detail
