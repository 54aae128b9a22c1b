"""What the benchmark scripts `tools/bench_*.py` share (`bench.common`); each script writes one report."""
