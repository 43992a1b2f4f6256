"""Everything that starts, continues or reads a run: train, evaluate, eval-codes, run folders,
checkpoints (read, load, resume) and local sweeps."""
