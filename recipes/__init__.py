"""Recipes: one self-contained training script per file, run with ``tune run recipes/<name>``.

The line below lets the start-up hook (build_backend/) resolve ``recipes`` here:
ttt-omni recipes
"""
