"""Llama-Omni checkpoints in the HF layout <-> this project's modules."""

from components.checkpoint.llama_omni import load_llama_omni, save_llama_omni

__all__ = ["load_llama_omni", "save_llama_omni"]
