#!/usr/bin/env python3
"""Score a fine-tuned model or LoRA adapter on a Home Assistant test set. `python3 evaluate.py --help` lists flags.

The installed package runs the same as `chattune-eval`."""

import sys

from chattune.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
