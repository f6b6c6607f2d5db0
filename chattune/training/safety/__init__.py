"""Run safety: atomic checkpoints and signals, resuming, the run's fingerprint and lock, the launch and input checks
before any work, the output folders, progress, the time budget."""
