"""Llama-Omni checkpoint layout <-> internal names (load/save: issue 3)."""
