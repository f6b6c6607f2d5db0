"""Training: the run behind train.py, the SFT and preference trainers, their shared arguments, the base model,
batching, the loss, attention, crash safety and progress reporting."""
