"""Adapters that switch a transformers / PEFT model instance to padfree (see patch.py)."""
