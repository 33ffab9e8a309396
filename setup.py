"""Build script for padfree.

`pip install -e .` needs no compiler: `padfree._C` (the C++/CUDA ops in `csrc/`) is then built just
in time on first use and cached (see `padfree/_ext.py`). Set `PADFREE_BUILD_EXT=1` to build it
ahead of time instead; it includes the CUDA sources when torch has CUDA and `nvcc` is found.

Non-editable installs copy `csrc/` into the package as `padfree/_csrc/` so that the just-in-time
build also works from a wheel.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Ship the C++/CUDA sources inside the package for the just-in-time build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "padfree" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CSRC, target)


def ahead_of_time_extensions():
    if os.environ.get("PADFREE_BUILD_EXT", "0") != "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    common = ["-O3", "-std=c++20"]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "padfree._C",
            cpp_sources + cuda_sources,
            define_macros=[("PADFREE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": common,
                "nvcc": common + ["-gencode=arch=compute_80,code=sm_80",
                                  "-gencode=arch=compute_90a,code=sm_90a",
                                  # PTX: newer GPUs (sm_100, sm_120) JIT-compile it at load time
                                  "-gencode=arch=compute_90,code=compute_90"],
            },
        )
    else:
        ext = cpp_extension.CppExtension("padfree._C", cpp_sources, extra_compile_args=common)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


extensions, ext_cmdclass = ahead_of_time_extensions()
setup(ext_modules=extensions, cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass})
