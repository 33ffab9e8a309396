"""Triton kernels and their launchers (no autograd here).

Every kernel is registered in `padfree.kernels.registry` with the launch configurations it can be
compiled with, so that `padfree compile-check` covers all of them. Importing this package never
fails: without triton, `runtime.HAS_TRITON` is False and the ops use their reference.
"""
