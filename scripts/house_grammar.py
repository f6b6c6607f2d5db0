#!/usr/bin/env python3
"""Write the GBNF grammar for one house, for llama.cpp's `--grammar-file` and home-llm's integration.
`python3 scripts/house_grammar.py --help` lists flags. The installed package runs the same as `chattune-grammar`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chattune.domains.homeassistant.grammar_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
