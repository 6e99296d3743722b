"""TTT fine-tuning recipes for Llama-Omni: the importable components."""
