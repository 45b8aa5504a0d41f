"""Benchmarks for securethread; ``python -m benchmarks [--quick] [--json]`` runs them all."""
