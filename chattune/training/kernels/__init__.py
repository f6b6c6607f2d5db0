"""Kernels: how batches are built and run: padding-free micro-batches, per-example attention, DPO's shared prompts,
the labelled-positions loss."""
