"""Checkpoint formats (GGUF import, AutoAWQ GEMM) and the `awq-jax` command line."""
