"""Evaluation: the run behind evaluate.py, what it reads, batched generation with reference likelihoods,
generic text metrics, and the result files."""
