"""The digits studies behind docs/results.md, run from the repository root as ``python -m experiments.<name>``:
the frontier of the three objectives, the SD3 digits base's and the pixel base's sweeps, on one shared runner
(``experiments/sweep.py``). The timing benchmarks behind docs/benchmarks.md are in ``bench/``."""
