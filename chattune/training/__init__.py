"""Training: the components train.py's recipe (chattune.commands.train) is built from: trainers, kernels, adapters and
run safety."""
