"""Triton kernels and their launchers (no autograd here).

Every kernel is registered in `padfree.kernels.registry` with the launch configurations it can be
compiled with, so that `padfree compile-check` covers all of them. Importing this package never
fails: without triton, `runtime.HAS_TRITON` is False and the ops use their reference.

One convention across the families (see registry's docstring): launch configurations are
`registry.Tile`s kept in one `registry.TileTable` per family (launcher defaults per arch, tuning
candidates, arch restrictions, compile-check launches, test override); dtypes and the precision
rule come from `common.DTYPES`, products from `common.dot`.
"""
