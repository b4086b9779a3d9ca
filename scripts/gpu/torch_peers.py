#!/usr/bin/env python
"""The GPU check's PyTorch peers, on the same shapes, null masks and group sizes as measure.py (scripts/gpu/inputs.py),
timed by the same timer (scripts/bench/timer.py, with ``torch.cuda.synchronize``), appended to OUT/gpu_results.csv.

- ``torch_layer``: what a GPU user would write instead of this project's layer, in eager PyTorch: router matmul,
  softmax and top-k, the null mask applied and real gate weights renormalized, null slots dropped *before* the
  gather, slots sorted by expert, ``torch._grouped_mm`` (CUTLASS on sm90) for w1, w3 and w2, silu(a) * b, and a
  gate-weighted ``index_add_`` back to the tokens. Forward + backward to every weight and x (autograd), bf16.
- ``torch_grouped_mm``: ``torch._grouped_mm`` alone on the grouped matmul of measure.py's gmm section: the real
  rows only (a view of the first R rows), forward at 100 % and forward + backward at 100 / 50 / 10 % real rows.

Without torch or without a CUDA device it records one skip row and exits 0 (the CPU run of the check).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import timer  # noqa: E402
from scripts.gpu import inputs  # noqa: E402
from scripts.gpu.results import Results, timing_note  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def _short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:300]


class _GroupedMM:
    """``torch._grouped_mm(a [M, K], b [G, K, N], offs)`` in the weight layout this torch accepts (found once)."""

    def __init__(self, torch):
        self.torch = torch
        self.transposed = None  # True: weights kept as [G, N, K] contiguous and passed as a transposed view

    def weight(self, w):
        """A weight [G, K, N] in the layout ``__call__`` passes on."""
        if self.transposed is None:
            self._probe(w)
        return w.transpose(-2, -1).contiguous().transpose(-2, -1) if self.transposed else w.contiguous()

    def _probe(self, w):
        torch = self.torch
        a = torch.randn(32, w.shape[1], device=w.device, dtype=w.dtype)
        offs = torch.tensor([16] * (w.shape[0] - 1) + [32], device=w.device, dtype=torch.int32).cumsum(0).clamp(max=32)
        offs = offs.to(torch.int32)
        for transposed in (True, False):
            b = w.transpose(-2, -1).contiguous().transpose(-2, -1) if transposed else w.contiguous()
            try:
                torch._grouped_mm(a, b, offs=offs)
                self.transposed = transposed
                return
            except Exception:  # noqa: BLE001 - try the other layout
                continue
        raise RuntimeError("torch._grouped_mm accepts neither weight layout on this device")

    def __call__(self, a, b, offs):
        return self.torch._grouped_mm(a, b, offs=offs)


def _layer_case(torch, gmm: _GroupedMM, dims: dict, mask_np, params):
    """A closure running one forward + backward of the eager layer for one null mask."""
    x, gate_w, w1, w2, w3, cot = params
    tokens, k, experts = dims["tokens"], dims["k"], dims["experts"]
    mask = torch.as_tensor(mask_np, device=x.device)
    token_of_slot = torch.arange(tokens, device=x.device).repeat_interleave(k)

    def step():
        probs = torch.softmax((x @ gate_w).float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)
        keep = ~mask
        wts = torch.where(keep, top_p, torch.zeros_like(top_p))
        total = wts.sum(-1, keepdim=True)
        wts = torch.where(total > 0, wts / torch.where(total > 0, total, torch.ones_like(total)), wts)
        keep_flat = keep.reshape(-1)
        ids = top_i.reshape(-1)[keep_flat]  # null slots dropped before the gather
        tok = token_of_slot[keep_flat]
        w_slot = wts.reshape(-1)[keep_flat]
        order = torch.argsort(ids, stable=True)
        ids, tok, w_slot = ids[order], tok[order], w_slot[order]
        offs = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
        xs = x[tok]
        h = torch.nn.functional.silu(gmm(xs, w1, offs)) * gmm(xs, w3, offs)
        y = gmm(h, w2, offs)
        out = torch.zeros_like(x).index_add_(0, tok, (y.float() * w_slot[:, None]).to(x.dtype))
        grads = torch.autograd.grad(out, (x, gate_w, w1, w2, w3), grad_outputs=cot)
        return grads

    return step


def layer_section(torch, results: Results, args, dims: dict) -> None:
    label = inputs.shape_label(dims)
    dev, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    D, F, E = dims["hidden"], dims["mlp"], dims["experts"]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32) * scale).to(dtype)

    gmm = _GroupedMM(torch)
    x = randn(dims["tokens"], D).requires_grad_(True)
    gate_w = randn(D, E, scale=D ** -0.5).requires_grad_(True)
    w1 = gmm.weight(randn(E, D, F, scale=D ** -0.5)).requires_grad_(True)
    w3 = gmm.weight(randn(E, D, F, scale=D ** -0.5)).requires_grad_(True)
    w2 = gmm.weight(randn(E, F, D, scale=F ** -0.5)).requires_grad_(True)
    cot = randn(dims["tokens"], D)
    masks = inputs.layer_masks(dims)
    keys = list(masks)
    calls = [_layer_case(torch, gmm, dims, masks[key], (x, gate_w, w1, w2, w3, cot)) for key in keys]
    log(f"[torch layer] {label}: weights as {'[E, N, K] transposed views' if gmm.transposed else '[E, K, N]'}")
    timings = timer.interleaved(calls, warmup=args.warmup, rounds=args.rounds, min_round_s=args.min_round_ms / 1e3,
                                sync=_sync(torch))
    by_key = dict(zip(keys, timings))
    for (p, mode), t in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = by_key.get((0.0, mode))
        ratio = base.median / t.median if base else ""
        results.add(section="torch_layer", backend="torch_layer", dtype="bf16", shape=label, real_frac_or_null=p,
                    mode=mode, pass_="fwdbwd", median_ms=t.median * 1e3, ratio=ratio,
                    ratio_of="tokens_per_s/tokens_per_s(null 0)", tokens_per_s=dims["tokens"] / t.median,
                    timing=timing_note(t, args.rounds),
                    note=f"torch {torch.__version__}; eager; torch._grouped_mm x3; null slots dropped before the gather")
        log(f"[torch layer] null={p:<4} {mode:16s} {t.median * 1e3:9.3f} ms")


def _sync(torch):
    def sync(out):
        torch.cuda.synchronize()
        return out

    return sync


def gmm_section(torch, results: Results, args, dims: dict) -> None:
    label = inputs.shape_label(dims)
    dev, dtype = "cuda", torch.bfloat16
    rows, k, n, e = dims["rows"], dims["k"], dims["n"], dims["experts"]
    gen = torch.Generator(device=dev).manual_seed(1)
    gmm = _GroupedMM(torch)
    x = torch.randn(rows, k, device=dev, generator=gen).to(dtype).requires_grad_(True)
    w = gmm.weight((torch.randn(e, k, n, device=dev, generator=gen) * k ** -0.5).to(dtype)).requires_grad_(True)
    cot = torch.randn(rows, n, device=dev, generator=gen).to(dtype)
    cases = []
    for frac in inputs.REAL_FRACS:
        sizes = inputs.group_sizes(rows, e, frac)
        real = int(sizes.sum())
        offs = torch.as_tensor(sizes, device=dev).cumsum(0).to(torch.int32)
        xr, cr = x[:real], cot[:real]

        if frac == 1.0:
            def fwd(xr=xr, offs=offs):
                with torch.no_grad():
                    return gmm(xr, w, offs)

            cases.append((("fwd", frac, real), fwd))

        def fwdbwd(xr=xr, cr=cr, offs=offs):
            y = gmm(xr, w, offs)
            return torch.autograd.grad(y, (x, w), grad_outputs=cr)

        cases.append((("fwdbwd", frac, real), fwdbwd))
    timings = timer.interleaved([c for _, c in cases], warmup=args.warmup, rounds=args.rounds,
                                min_round_s=args.min_round_ms / 1e3, sync=_sync(torch))
    full = {key[0]: t.median for (key, _), t in zip(cases, timings) if key[1] == 1.0}
    for ((pass_name, frac, real), _), t in zip(cases, timings):
        ratio = "" if frac == 1.0 else t.median / full[pass_name]
        results.add(section="torch_gmm", backend="torch_grouped_mm", dtype="bf16", shape=label,
                    real_frac_or_null=frac, pass_=pass_name, median_ms=t.median * 1e3, ratio=ratio,
                    ratio_of="" if frac == 1.0 else "t / t(100% real)", timing=timing_note(t, args.rounds),
                    note=f"real_rows={real}; torch {torch.__version__}; only the real rows passed")
        log(f"[torch gmm] {pass_name:6s} real={frac:<4} {t.median * 1e3:9.3f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="layer,gmm")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-round-ms", type=float, default=None)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.tiny else 5)
    args.min_round_ms = args.min_round_ms if args.min_round_ms is not None else (1.0 if args.tiny else 20.0)
    args.warmup = max(1, args.warmup)
    results = Results(pathlib.Path(args.out))
    t0 = time.perf_counter()
    # Without torch, CUDA or torch._grouped_mm the peers cannot run. That is expected in the tiny CPU run; on the
    # GPU machine it means the peers are missing, so the section must not read "ok" (a skip is not a pass).
    skipped = 0 if args.tiny else 1
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        results.add(section="torch_layer", backend="torch_layer", note=f"skipped: torch not importable ({_short_error(err)})")
        results.close()
        log("[torch] skipped: torch not importable")
        return skipped
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        results.add(section="torch_layer", backend="torch_layer",
                    note=f"skipped: torch {torch.__version__} without CUDA or torch._grouped_mm")
        results.close()
        log("[torch] skipped: no CUDA device or no torch._grouped_mm")
        return skipped
    layer_dims = inputs.LAYER_TINY if args.tiny else inputs.LAYER
    gmm_dims = inputs.GMM_TINY if args.tiny else inputs.GMM
    status = 0
    for section, fn, dims in (("layer", layer_section, layer_dims), ("gmm", gmm_section, gmm_dims)):
        if section not in args.sections.split(","):
            continue
        try:
            fn(torch, results, args, dims)
        except Exception as err:  # noqa: BLE001 - report, keep the other section
            traceback.print_exc()
            results.add(section=f"torch_{section}", backend="torch_layer" if section == "layer" else "torch_grouped_mm",
                        shape=inputs.shape_label(dims), note=f"failed: {_short_error(err)}")
            status = 1
        torch.cuda.empty_cache()
    results.close()
    log(f"[torch] done in {time.perf_counter() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
