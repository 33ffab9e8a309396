"""Every Triton kernel is registered for the compile check, and the check really compiles."""

import inspect
import os
import subprocess
import sys

import pytest

from padfree.kernels import registry


def test_every_kernel_is_registered():
    modules = registry.import_all_kernel_modules()
    registered = {entry.name for entry in registry.all_kernels()}
    found = set()
    for name in modules:
        module = sys.modules[name]
        for attr, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if attr.endswith("_kernel") and inspect.isfunction(fn) and fn.__module__ == name:
                found.add(f"{name}.{attr}")
    assert found, "no *_kernel found in padfree.kernels"
    assert found <= registered, f"kernels missing from the registry: {sorted(found - registered)}"


def test_every_registered_kernel_has_launches_with_full_signatures():
    for entry in registry.all_kernels():
        launches = list(entry.launches())
        assert launches, entry.name
        arg_names = entry.kernel.fn.__code__.co_varnames[: entry.kernel.fn.__code__.co_argcount]
        for launch in launches:
            assert tuple(launch.signature) == tuple(arg_names), (entry.name, launch.label)
            constexpr = {n for n, t in launch.signature.items() if t == "constexpr"}
            assert constexpr == set(launch.constexprs), (entry.name, launch.label)


@pytest.mark.slow
def test_compile_check_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "padfree.cli", "compile-check", "--arch", "80", "90",
                           "--kernel", "attention_dropout_mask"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sm_80" in done.stdout and "sm_90" in done.stdout and "0 failed" in done.stdout
