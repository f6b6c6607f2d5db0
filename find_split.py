#!/usr/bin/env python3
"""Print the token ids that open and close an assistant response in MODEL's chat template, verified in
context, and the --prefix_ids/--suffix_ids flags that reproduce train.py's automatic mask."""

import sys

from chattune.data.find_split_cli import main

if __name__ == "__main__":
    sys.exit(main())
