"""Benchmarks of graphckpt against hand-placed checkpointing: models, baselines, measurement."""
