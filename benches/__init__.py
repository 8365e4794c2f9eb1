"""The benchmarks: `e2e.py` (procrastinate's worker, fastworker and pgqueuer side by side,
one module per part under `parts/`), `soak.py` and `idle_statements.py`.

A package so that the side-by-side benchmark's parent and its child processes share one
set of tasks, configs and measurements; each script still runs as `python benches/NAME.py`.
"""
