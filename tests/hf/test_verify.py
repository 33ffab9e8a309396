"""`padfree verify`: the table it prints and its exit code."""

from __future__ import annotations

import json

import pytest

from padfree import cli


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
    path.write_text(json.dumps(dict(model_type="gpt_oss")))
    assert cli.main(["verify", "--config", str(path)]) == 2
    assert "model_type 'gpt_oss' is not in padfree's architecture table" in capsys.readouterr().err


def test_verify_needs_a_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify"])
    assert "--model-type" in capsys.readouterr().err
