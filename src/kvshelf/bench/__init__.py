"""Benchmarks: workloads that print a JSON summary of ratios measured side by side in one run."""
