"""Run safety: atomic checkpoints and signals, resuming, the output folders, the checks before any work, progress,
the time budget."""
