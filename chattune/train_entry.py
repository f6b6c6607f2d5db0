"""train.py and `chattune-train`: pick the memory allocator first, before torch is imported (chattune.allocator)."""

from __future__ import annotations

from chattune.cli import entry_point  # standard library only: safe before the restart


@entry_point
def main() -> int:
    from chattune.allocator import use_scalable_allocator

    use_scalable_allocator()  # returns unless this process must restart with another malloc
    from chattune.training.run import main as train

    return train.__wrapped__()  # this function carries entry_point's handling already
