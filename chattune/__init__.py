"""chattune: turn a small open chat model into a specialist."""
