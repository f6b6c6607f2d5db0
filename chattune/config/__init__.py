"""Configuration: every train.py flag in one dataclass, and YAML recipes of those flags."""
