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
