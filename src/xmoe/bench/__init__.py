"""Benchmark harnesses behind `xmoe bench ...` and benchmarks/."""
