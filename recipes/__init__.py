"""Recipes: one self-contained training script per file, run with ``tune run recipes/<name>``."""
