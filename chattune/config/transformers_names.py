"""The names train.py's flags take from transformers (schedules, optimizers, attention kernels), known without
importing it.

Why: transformers' lists live in modules that import torch, which takes seconds, and a flag check runs before any
of that (and again after train.py's allocator restart, chattune.allocator). The tuples below are a subset of
transformers 5's (tests/test_flags.py checks it against the installed version): a name in them is accepted at
once; any other name is looked up in the installed transformers before it is refused, so a name a newer
transformers adds still works, at the cost of that import on this path only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
)
# Whether a kernel can run here (flash-attention needs its package and a GPU) is checked when the model loads.
ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def installed_schedules() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [schedule.value for schedule in SchedulerType]


def installed_optimizers() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [name.value for name in OptimizerNames]


def installed_attention_kernels() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def unknown_name(name: str, known: Sequence[str], installed: Callable[[], list[str]]) -> list[str] | None:
    """None when `name` is valid; otherwise the installed transformers' names, for the refusal to list."""
    if name in known:
        return None
    names = installed()
    return None if name in names else names
