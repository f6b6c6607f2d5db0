#!/usr/bin/env python3
"""Fine-tune a causal LM on chat data (SFT or DPO, full or LoRA). `python3 train.py --help` lists every flag.

The installed package runs the same as `chattune-train`."""

import sys

from chattune.train_entry import main

if __name__ == "__main__":
    sys.exit(main())
