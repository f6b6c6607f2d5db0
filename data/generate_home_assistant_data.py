#!/usr/bin/env python3
"""Generate the Home Assistant chat datasets; see data/README.md.

The logic lives in chattune.domains.homeassistant.datagen; the installed package runs the same as `chattune-data`
(which writes to ./data unless --output_dir says otherwise; this script writes beside itself).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from any folder, without installing chattune
    sys.path.insert(0, str(ROOT))

from chattune.domains.homeassistant.datagen.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_output_dir=Path(__file__).resolve().parent))
