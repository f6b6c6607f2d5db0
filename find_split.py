#!/usr/bin/env python3
"""Print the token ids that open and close an assistant response in a model's chat template, verified in context.

`python3 find_split.py --help` lists flags; the installed package runs the same as `chattune-find-split`.
"""

import sys

from chattune.commands.find_split import main

if __name__ == "__main__":
    sys.exit(main())
