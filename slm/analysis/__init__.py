"""Studying trained checkpoints: eval tables, benchmark tasks, per-token log-probs and dynamics, the batches a run
trained on, status, plots, sampling, and the Python API (`slm.open`). Imports every subpackage but none imports
it."""
