import subprocess
import sys

from padfree import cli


def test_env_reports_versions_and_backends(capsys):
    assert cli.main(["env", "--no-build"]) == 0
    out = capsys.readouterr().out
    for row in ("torch", "triton", "GPU", "usable backends", "padfree._C"):
        assert row in out


def test_unknown_subcommand_fails():
    done = subprocess.run([sys.executable, "-m", "padfree.cli", "frobnicate"], capture_output=True, text=True)
    assert done.returncode != 0 and "invalid choice" in done.stderr


def test_env_lists_cuda_only_where_it_can_run(capsys):
    import torch

    assert cli.main(["env", "--no-build"]) == 0
    usable = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("usable backends"))
    assert ("cuda" in usable) == torch.cuda.is_available() and "reference" in usable
