#!/usr/bin/env python3
"""Export a Hugging Face model folder to one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.
`python3 scripts/export_gguf.py --help` lists flags. The installed package runs the same as `chattune-export`, and
`python3 -m chattune.export.gguf` too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chattune.export.gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
