"""Benchmark harness: trainers side by side on one dataset."""
