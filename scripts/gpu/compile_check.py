#!/usr/bin/env python
"""Compile the fused layer's Triton kernels for an H100/H200 (sm_90a) on a machine without a GPU, and report what
each one needs: shared memory, registers, spills, and whether Hopper's wgmma and cp.async were emitted.

    pip install triton==3.4.0        # into any Python 3.10-3.12 environment: ptxas comes with it
    python scripts/gpu/compile_check.py --triton-python /path/to/that/python [--dtype bfloat16] [--tiles ...]

How: the layer's forward + backward (``gmm_backend="triton"``, fused) is lowered for CUDA on this host with
Pallas' debug output on, which prints each kernel's Triton IR; each module is then compiled by the standalone
Triton compiler (run with ``--triton-python``) for ``cuda:90`` and its PTX assembled with ``ptxas -v``. XLA on the
GPU compiles the same IR with the Triton it bundles, whose version may differ: this catches kernels that cannot fit
(shared memory over 227 KB, spills), not every difference. It runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

COMPILE = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = []
for path in sys.argv[3:]:
    row = {"kernel": os.path.basename(path).split(".")[0]}
    try:
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": int(sys.argv[1]), "num_stages": int(sys.argv[2])})
        ptx = k.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                           text=True)
        info = " ".join(line.split("info    : ")[-1] for line in r.stderr.splitlines()
                        if "registers" in line or "spill" in line)
        row.update(shared=k.metadata.shared, wgmma="wgmma" in ptx, cp_async="cp.async" in ptx, ptxas=info)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
    out.append(row)
print(json.dumps(out))
"""


def triton_modules(dims: dict, dtype_name: str, tiles) -> list[tuple[str, str]]:
    """(kernel name, Triton IR text) of every kernel in the layer's forward + backward, lowered for CUDA."""
    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from null_moe import NullMoEConfig, NullRoutedMoE
    from null_moe import triton_fused

    dtype = jnp.dtype(dtype_name)
    pallas_call = pl.pallas_call
    pl.pallas_call = functools.partial(pallas_call, debug=True)  # prints each kernel's Triton IR as it lowers
    if tiles is not None:
        original = triton_fused.FusedTiles.for_dtype
        triton_fused.FusedTiles.for_dtype = staticmethod(lambda d: tiles)
    try:
        cfg = NullMoEConfig(hidden_dim=dims["hidden"], intermediate_dim=dims["mlp"], n_routed_experts=dims["experts"],
                            num_experts_per_tok=dims["k"], gmm_backend="triton")
        layer = NullRoutedMoE.init(cfg, key=jax.random.PRNGKey(0))
        layer = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layer)
        params, static = eqx.partition(layer, eqx.is_inexact_array)
        x = hax.named(jnp.zeros((dims["tokens"], dims["hidden"]), dtype), (hax.Axis("batch", dims["tokens"]), cfg.Embed))
        mask = jnp.zeros((dims["tokens"], dims["k"]), bool)

        def step(params, x, mask):
            model = eqx.combine(params, static)
            y, _ = model.apply(x, model.route_forced(x, null_mask=mask))
            return jnp.sum(y.array.astype(jnp.float32) ** 2)

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            jax.jit(jax.value_and_grad(step, argnums=(0, 1))).trace(params, x, mask).lower(lowering_platforms=("cuda",))
    finally:
        pl.pallas_call = pallas_call
        if tiles is not None:
            triton_fused.FusedTiles.for_dtype = original
    modules = []
    for chunk in printed.getvalue().split("The Triton module for pallas_call")[1:]:
        text = _clean(chunk[chunk.index("module @"):])
        modules.append((re.search(r"tt.func public @([A-Za-z0-9_]+)", text).group(1), text))
    return modules


def _clean(text: str) -> str:
    """Pallas' debug print with its source locations stripped: plain Triton IR the standalone parser reads."""
    text = re.sub(r" \[(unknown|[^\[\]\n]*\.py[^\[\]\n]*|[^\[\]\n]*:\d+:\d+[^\[\]\n]*)\]", "", text)
    text = re.sub(r'\s+"[^"\n]*"\(#loc\d*\)', "", text)
    text = re.sub(r"\s+#loc\d*(?=\s*$)", "", text, flags=re.M)
    text = text[: text.index("\n}", text.rindex("tt.return")) + 2]
    return "\n".join(line for line in text.splitlines() if not line.startswith("#loc")) + "\n"


def main(argv=None) -> int:
    from scripts.gpu import inputs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton-python", required=True, help="a Python with the standalone triton package")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tiles", default=None, help="JSON of FusedTiles fields to try instead of the shipped ones")
    args = ap.parse_args(argv)
    import jax.numpy as jnp

    from null_moe.triton_fused import FusedTiles

    tiles = FusedTiles(**{**FusedTiles.for_dtype(jnp.dtype(args.dtype)).__dict__, **json.loads(args.tiles)}) \
        if args.tiles else None
    shown = tiles or FusedTiles.for_dtype(jnp.dtype(args.dtype))
    modules = triton_modules(inputs.LAYER, args.dtype, tiles)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (name, text) in enumerate(modules):
            path = pathlib.Path(tmp) / f"{i:02d}_{name}.ttir"
            path.write_text(text)
            paths.append(str(path))
        proc = subprocess.run([args.triton_python, "-c", COMPILE, str(shown.num_warps), str(shown.num_stages), *paths],
                              capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{inputs.shape_label(inputs.LAYER)}, {args.dtype}, tiles {shown}")
    print("| kernel | shared memory | wgmma | cp.async | ptxas |")
    print("| --- | ---: | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | FAILED: {r['error']} | | | |")
        else:
            print(f"| {r['kernel']} | {r['shared']:,} B | {'yes' if r['wgmma'] else 'no'} | "
                  f"{'yes' if r['cp_async'] else 'no'} | {r['ptxas']} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
