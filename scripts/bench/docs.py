"""The generated tables of docs/BENCH.md: config fields (from BenchConfig's help texts) and result columns (from
scripts/bench/schema.py). ``python -m scripts.bench.docs`` rewrites them; tests/test_bench.py checks they are
current.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from scripts.bench import schema
from scripts.bench.config import BenchConfig, ShapeConfig, WandbConfig

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "BENCH.md")


def _yaml(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml(x) for x in v) + "]"
    return str(v)


def _rows(cls, prefix: str = ""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name == "wandb":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield f"| `{prefix}{f.name}` | `{_yaml(default)}` | {f.metadata['help']} |"


def config_table() -> str:
    head = ["| field | default | meaning |", "| --- | --- | --- |"]
    shape = ["", "Each entry of `shapes`:", ""] + head + list(_rows(ShapeConfig))
    return "\n".join(head + list(_rows(BenchConfig)) + list(_rows(WandbConfig, "wandb.")) + shape)


BLOCKS = {"config": config_table, "columns": schema.markdown_table}


def render(text: str) -> str:
    """``text`` with every generated block (between ``<!-- generated: NAME -->`` and ``<!-- end -->``) redone."""
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(\n<!-- end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"docs/BENCH.md has no block '<!-- generated: {name} -->' ... '<!-- end -->'")
        text = pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)
    return text


if __name__ == "__main__":
    with open(DOC) as f:
        old = f.read()
    new = render(old)
    if new != old:
        with open(DOC, "w") as f:
            f.write(new)
    print(f"{DOC}: {'updated' if new != old else 'up to date'}", file=sys.stderr)
