"""Benchmarks and planning: training throughput of the variants (bench), where a step's time goes (breakdown), the sharding plan and memory per GPU (plan)."""
