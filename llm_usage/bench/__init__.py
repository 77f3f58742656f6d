"""Benchmarks: each worker measured against baselines taken in the same run (`llm-usage bench`)."""
