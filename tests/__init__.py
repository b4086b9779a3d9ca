"""Test package. It must be a regular package: draccus installs a top-level `tests` package into
site-packages, which would otherwise shadow this directory for `from tests.wandb_records import ...`."""
