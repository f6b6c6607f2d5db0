"""What `accelerate launch --config_file ...` asked of this process, checked before the data and the model load.

accelerate passes a config file to the processes it starts as environment variables (ACCELERATE_USE_DEEPSPEED,
ACCELERATE_MIXED_PRECISION, ...). A combination that cannot run on this machine would otherwise fail minutes later,
inside transformers, with a traceback per process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from chattune.config.flags import FlagError, TrainFlags

HALF_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}


def launched_with_deepspeed(environ: Mapping[str, str]) -> bool:
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def requested_precision(flags: TrainFlags) -> str:
    """The compute dtype the flags ask for, before the hardware is known (chattune.models.loading.choose_dtype)."""
    return "bfloat16" if flags.bf16 else "float16" if flags.fp16 else "float32"


def check_launch_precision(flags: TrainFlags, compute_dtype: str, environ: Mapping[str, str] = os.environ) -> None:
    """DeepSpeed takes its precision from the launcher's config (mixed_precision: bf16 in deepspeed_zero3.yaml) and
    transformers refuses to train when train.py's precision differs. `compute_dtype` is the dtype train.py chose
    ("float32", "bfloat16", "float16"): --bf16 without bfloat16 hardware, a CPU included, trains in float32."""
    launcher = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = HALF_PRECISIONS.get(launcher)
    if not launched_with_deepspeed(environ) or wanted is None or wanted == compute_dtype:
        return
    flag = f"--{launcher}"
    why = f"no {flag}" if not getattr(flags, launcher) else f"{flag}, but this machine has no {wanted} hardware"
    raise FlagError(
        f"accelerate launch: the DeepSpeed config asks for {launcher} mixed precision, but train.py trains in "
        f"{compute_dtype} here ({why}) and DeepSpeed needs the two to agree: pass {flag} on a GPU that runs {wanted}, "
        "or launch with --mixed_precision no"
    )
