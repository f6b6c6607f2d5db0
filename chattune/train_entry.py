"""train.py and `chattune-train`: read the flags, pick the memory allocator, then train.

The flags are read first, with the standard library only (chattune.config.flags), so `--help` and a refused flag
answer in a fraction of a second, before the allocator restart (chattune.allocator) and before torch is imported.
The restarted process reads them again: milliseconds.
"""

from __future__ import annotations

from chattune.cli import entry_point  # standard library only: safe before the restart


@entry_point
def main() -> int:
    from chattune.allocator import use_scalable_allocator
    from chattune.config.flags import check_quantization_packages, parse_flags
    from chattune.training.safety.launcher import check_launch_precision, requested_precision

    flags = parse_flags()  # --help and refused flags end here
    check_quantization_packages(flags)  # a missing quantization package too, before torch is imported
    check_launch_precision(flags, requested_precision(flags))  # the flags' side; commands/train checks the hardware's
    use_scalable_allocator()  # returns unless this process must restart with another malloc
    from chattune.commands.train import start

    return start(flags)
