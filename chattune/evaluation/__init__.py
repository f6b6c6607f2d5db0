"""Evaluation: what evaluate.py reads, batched generation with reference likelihoods, scoring and the result files;
the recipe itself is chattune.commands.evaluate."""
