"""Hand-written reference implementations for the A/B benchmarks (see benchmarks/compare.py)."""
