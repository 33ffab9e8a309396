"""torch.library custom ops of padfree, one module per op family.

Each public function validates its input (see `padfree._checks`), picks a backend
(`padfree._backend.resolve`) and calls a `padfree::` custom op. Keyword `check=False` skips the
validation that copies device data to the host (hot paths); shape/dtype/device checks always run.
"""
