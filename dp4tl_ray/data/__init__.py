"""Data sources: ImageNet-style folder trees, parquet shards, and the synthetic generator."""
