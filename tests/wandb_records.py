"""Test helper: reading offline W&B runs. The parser lives in ``experiments/speedrun/wandb_offline.py`` (the quality
study uses it too); this module re-exports it so ``from tests.wandb_records import read_wandb_records`` keeps working."""

from experiments.speedrun.wandb_offline import (  # noqa: F401
    find_run_dirs,
    find_wandb_file,
    iter_raw_records,
    iter_records,
    read_wandb_records,
)

__all__ = ["find_run_dirs", "find_wandb_file", "iter_raw_records", "iter_records", "read_wandb_records"]
