"""Benchmarks of ViT_C against ViT_P: runtime latency against the matmul limit, HTTP load, serving overhead."""
