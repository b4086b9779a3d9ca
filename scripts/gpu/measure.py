#!/usr/bin/env python
"""The GPU check's JAX timings (scripts/gpu/README.md): the null-routed layer, then the grouped matmul alone.

Sections, most important first (a group that would start after ``--budget-s`` is skipped and recorded so):

- ``layer``: ``null_moe.NullRoutedMoE`` forward + backward (to every weight and x) with forced routing at the
  first seed shape (tokens 32768, hidden 2048, mlp 1408, 60 experts, k 8), null 0 / 0.5 / 0.9 / every slot, both
  null modes, for each expert path in ``--layer-paths``: ``triton`` (the default GPU path: fused kernels),
  ``triton_unfused`` (dispatch -> three grouped matmuls -> combine) and ``tokamax`` (tokamax's grouped matmul,
  when it imports). The masks are inputs (scripts/gpu/inputs.py, shared with the PyTorch peer), so one executable
  serves every point of a path.
- ``gmm``: the grouped matmul 262,144 x 2048 -> 1408 over 60 experts: ``dense`` (one jnp.dot of all rows),
  ``triton`` (null_moe.triton_gmm, zeros written past the real rows, as the unfused layer uses it),
  ``triton_skip`` (rows past the real ones left unwritten) and ``tokamax``; forward at 100 % real rows and
  forward + backward at 100 / 50 / 10 %.

Timing (scripts/bench/timer.py, the project's one timer): every case compiled and run first, then ``--rounds``
interleaved rounds; each sample is a run of back-to-back calls holding at least ``--min-round-ms`` of device work
(the count calibrated per case), its time per call recorded; the figure is the median. Rows go to
``OUT/gpu_results.csv`` as each group finishes (scripts/gpu/results.py); scripts/gpu/summary.py writes the
summary. ``--tiny`` shrinks every shape for a CPU run (the Triton kernels then run in Pallas interpret mode).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import sys
import time
import traceback
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from scripts.bench import timer  # noqa: E402
from scripts.gpu import inputs  # noqa: E402
from scripts.gpu.results import Results, timing_note  # noqa: E402

# The Pallas Triton backend announces its deprecation on every lowering (jax >= 0.11); it still works.
warnings.filterwarnings("ignore", category=DeprecationWarning)

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(msg, flush=True)


def _short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:300]


def over_budget(args, what: str) -> bool:
    elapsed = time.perf_counter() - _T0
    if args.budget_s and elapsed > args.budget_s:
        log(f"[measure] {elapsed:.0f} s elapsed > budget {args.budget_s} s: skipping {what}")
        return True
    return False


def _time(calls, args):
    return timer.interleaved(calls, warmup=args.warmup, rounds=args.rounds, min_round_s=args.min_round_ms / 1e3)


def environment_row(results: Results) -> None:
    import jaxlib

    def version(dist):
        try:
            import importlib.metadata as md

            return md.version(dist)
        except Exception:  # noqa: BLE001
            return "-"

    from null_moe.pallas_triton import triton_available

    info = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "backend": jax.default_backend(),
        "devices": ";".join(str(d.device_kind) for d in jax.devices()),
        "triton(pip)": version("triton"),
        "pallas_triton": "yes" if triton_available() else "no",
        "tokamax": version("tokamax"),
        "torch": version("torch"),
    }
    note = " ".join(f"{k}={v}" for k, v in info.items())
    log(f"[env] {note}")
    results.add(section="env", note=note)


# ---------------------------------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------------------------------
LAYER_PATHS = {
    # name -> (gmm_backend, fused_experts)
    "triton": ("triton", True),
    "triton_unfused": ("triton", False),
    "tokamax": ("tokamax", False),
    "tiled": ("tiled", True),
}


def layer_section(results: Results, args, dtype_name: str, dims: dict) -> None:
    for path in args.layer_paths:
        label = inputs.shape_label(dims)
        if over_budget(args, f"layer {path}"):
            results.add(section="layer", backend=path, dtype=dtype_name, shape=label, note="skipped: time budget")
            continue
        if path == "tokamax" and importlib.util.find_spec("tokamax") is None:
            results.add(section="layer", backend=path, dtype=dtype_name, shape=label, note="skipped: no tokamax")
            continue
        try:
            _layer(results, args, dtype_name, dims, path)
        except Exception as err:  # noqa: BLE001 - one path's failure must not lose the others
            traceback.print_exc()
            results.add(section="layer", backend=path, dtype=dtype_name, shape=label, note=f"failed: {_short_error(err)}")


def _layer(results, args, dtype_name, dims, path) -> None:
    import equinox as eqx
    import haliax as hax

    from null_moe import NullMoEConfig, NullRoutedMoE

    dtype = DTYPES[dtype_name]
    tokens, k = dims["tokens"], dims["k"]
    backend, fused = LAYER_PATHS[path]
    cfg = NullMoEConfig(hidden_dim=dims["hidden"], intermediate_dim=dims["mlp"], n_routed_experts=dims["experts"],
                        num_experts_per_tok=k, gmm_backend=backend, fused_experts=fused)
    k_init, k_x, k_cot = jax.random.split(jax.random.PRNGKey(2), 3)
    layer = NullRoutedMoE.init(cfg, key=k_init)
    layer = jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, layer)
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    x = hax.named(jax.random.normal(k_x, (tokens, cfg.hidden_dim), jnp.float32).astype(dtype),
                  (hax.Axis("batch", tokens), cfg.Embed))
    cot = jax.random.normal(k_cot, (tokens, cfg.hidden_dim), jnp.float32)

    def loss(params, x, mask):
        model = eqx.combine(params, static)
        y, _ = model.apply(x, model.route_forced(x, null_mask=mask))
        return jnp.sum(y.array.astype(jnp.float32) * cot)

    masks = {key: jnp.asarray(m) for key, m in inputs.layer_masks(dims).items()}
    if path != "triton":  # the contrast paths: enough points to see where the time goes
        masks = {key: m for key, m in masks.items() if key[1] == "independent" and key[0] in (0.0, 0.9, 1.0)}
    label = inputs.shape_label(dims)
    log(f"[layer] {dtype_name} {label} path={path} (backend {layer.backend}, {layer.expert_path}): compiling")
    first = next(iter(masks.values()))
    step, compile_s = timer.compile_ahead(jax.value_and_grad(loss, argnums=(0, 1)), params, x, first)
    log(f"[layer]   compiled in {compile_s:.1f} s")
    keys = list(masks)
    timings = _time([(lambda m=masks[key]: step(params, x, m)) for key in keys], args)
    by_key = dict(zip(keys, timings))
    for (p, mode), t in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ms = t.median * 1e3
        base = by_key.get((0.0, mode))
        ratio = base.median / t.median if base else ""
        realized = float(np.mean(np.asarray(masks[(p, mode)])))
        results.add(
            section="layer", backend=path, dtype=dtype_name, shape=label, real_frac_or_null=p, mode=mode,
            pass_="fwdbwd", median_ms=ms, ratio=ratio, ratio_of="tokens_per_s/tokens_per_s(null 0)",
            tokens_per_s=tokens / t.median, timing=timing_note(t, args.rounds),
            note=(f"realized_null={realized:.4f}; gmm_backend={layer.backend}; expert_path={layer.expert_path}; "
                  f"compile_s={compile_s:.1f}"),
        )
        log(f"[layer]   {path:15s} null={p:<4} {mode:16s} {ms:9.3f} ms  {tokens / t.median:12,.0f} tok/s  "
            f"x{ratio if ratio == '' else f'{ratio:.2f}'} vs null 0")


# ---------------------------------------------------------------------------------------------------------------
# The grouped matmul alone.
# ---------------------------------------------------------------------------------------------------------------
def _gmm_fns(names: list[str]) -> dict:
    from null_moe.triton_gmm import triton_gmm

    fns = {}
    if "triton" in names:
        fns["triton"] = lambda x, w, gs: triton_gmm(x, w, gs)
    if "triton_skip" in names:
        fns["triton_skip"] = lambda x, w, gs: triton_gmm(x, w, gs, zero_null_rows=False)
    if "tokamax" in names:
        try:
            import tokamax

            fns["tokamax"] = lambda x, w, gs: tokamax.ragged_dot(x, w, gs)
        except Exception as err:  # noqa: BLE001
            log(f"[gmm] tokamax unavailable: {_short_error(err)}")
    return fns


def gmm_section(results: Results, args, dtype_name: str, dims: dict) -> None:
    label = inputs.shape_label(dims)
    if over_budget(args, "gmm"):
        results.add(section="gmm", dtype=dtype_name, shape=label, note="skipped: time budget")
        return
    try:
        _gmm(results, args, dtype_name, dims, label)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        results.add(section="gmm", dtype=dtype_name, shape=label, note=f"failed: {_short_error(err)}")


def _gmm(results, args, dtype_name, dims, label) -> None:
    dtype = DTYPES[dtype_name]
    rows, k, n, e = dims["rows"], dims["k"], dims["n"], dims["experts"]
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) / math.sqrt(k)).astype(dtype)
    cot = jax.random.normal(kc, (rows, n), jnp.float32).astype(dtype)
    sizes = {f: jnp.asarray(inputs.group_sizes(rows, e, f)) for f in inputs.REAL_FRACS}

    def fwd(f):
        return lambda x, w, gs: f(x, w, gs)

    def fwdbwd(f):
        def run(x, w, gs):
            y, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
            return (y, *vjp(cot))

        return run

    cases, notes = [], {}
    dense_fwd, c_s = timer.compile_ahead(lambda x, w0: jnp.dot(x, w0), x, w[0])
    cases.append((("dense", "fwd", 1.0), lambda: dense_fwd(x, w[0])))
    notes[("dense", "fwd")] = f"compile_s={c_s:.1f}; one matmul of all {rows} rows"
    for name, f in _gmm_fns(args.gmm_backends).items():
        for pass_name, make in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            try:
                exe, c_s = timer.compile_ahead(make(f), x, w, sizes[1.0])
                notes[(name, pass_name)] = f"compile_s={c_s:.1f}"
                fracs = (1.0,) if pass_name == "fwd" else inputs.REAL_FRACS
                for frac in fracs:
                    cases.append(((name, pass_name, frac), lambda exe=exe, gs=sizes[frac]: exe(x, w, gs)))
                log(f"[gmm]   {name} {pass_name}: compiled in {c_s:.1f} s")
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                results.add(section="gmm", backend=name, dtype=dtype_name, shape=label, pass_=pass_name,
                            note=f"compile/run failed: {_short_error(err)}")
    timings = _time([call for _, call in cases], args)
    by_key = {key: t for (key, _), t in zip(cases, timings)}
    dense = by_key[("dense", "fwd", 1.0)].median
    for (name, pass_name, frac), t in by_key.items():
        if name == "dense":
            ratio, ratio_of = 1.0, "dense speed"
        elif frac == 1.0 and pass_name == "fwd":
            ratio, ratio_of = dense / t.median, "dense speed (t_dense / t)"
        else:
            full = by_key.get((name, pass_name, 1.0))
            ratio, ratio_of = (t.median / full.median if full else ""), "t / t(100% real)"
        real_rows = rows if name == "dense" else int(np.sum(np.asarray(sizes[frac])))
        results.add(section="gmm", backend=name, dtype=dtype_name, shape=label, real_frac_or_null=frac,
                    pass_=pass_name, median_ms=t.median * 1e3, ratio=ratio, ratio_of=ratio_of,
                    timing=timing_note(t, args.rounds), note=f"real_rows={real_rows}; {notes.get((name, pass_name), '')}")
        log(f"[gmm]   {name:12s} {pass_name:6s} real={frac:<4} {t.median * 1e3:9.3f} ms  ratio={ratio}")


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu", help="output folder (gpu_results.csv)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU run (Pallas interpret mode)")
    ap.add_argument("--sections", default="layer,gmm")
    ap.add_argument("--layer-paths", default=None,
                    help="expert paths of the layer section (default triton,triton_unfused; tiny: triton,tiled; also tokamax)")
    ap.add_argument("--gmm-backends", default="triton,triton_skip,tokamax", help="grouped matmuls to time")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, tiny 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing (at least 1)")
    ap.add_argument("--min-round-ms", type=float, default=None,
                    help="device work per timed sample, in ms (default 20; tiny 1)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip groups starting after this many s (0: none)")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.gmm_backends = [b for b in args.gmm_backends.split(",") if b]
    default_paths = "triton,tiled" if args.tiny else "triton,triton_unfused"
    args.layer_paths = [p for p in (args.layer_paths or default_paths).split(",") if p]
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    for p in args.layer_paths:
        if p not in LAYER_PATHS:
            ap.error(f"--layer-paths: unknown path {p!r}; choose from {sorted(LAYER_PATHS)}")
    args.rounds = args.rounds or (2 if args.tiny else 5)
    args.warmup = max(1, args.warmup)
    if args.min_round_ms is None:
        args.min_round_ms = 1.0 if args.tiny else 20.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    results = Results(out)
    environment_row(results)
    layer_dims = inputs.LAYER_TINY if args.tiny else inputs.LAYER
    gmm_dims = inputs.GMM_TINY if args.tiny else inputs.GMM
    for dtype_name in args.dtypes:
        for section in args.sections:
            if section == "layer":
                layer_section(results, args, dtype_name, layer_dims)
            elif section == "gmm":
                gmm_section(results, args, dtype_name, gmm_dims)
            else:
                log(f"[measure] unknown section {section!r} skipped")
    results.close()
    log(f"[measure] done in {time.perf_counter() - _T0:.0f} s; rows in {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
