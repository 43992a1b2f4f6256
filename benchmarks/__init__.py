"""Benchmarks and the CPU protocols behind docs/RESULTS.md and docs/BENCHMARKS.md.

An importable package: run each script from the repository root as ``python -m benchmarks.<name>``
(the Makefile's ``bench-*`` targets do), and import its functions in tests as
``from benchmarks import results_cpu``. Measured results live in ``benchmarks/results/``: one canonical
file per protocol at the top, earlier rounds and probes in ``benchmarks/results/archive/``.
"""
