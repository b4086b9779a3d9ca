"""Bench CLI (scripts/bench): errors as one line before any compute, durable rows and resume, W&B bookkeeping,
the statistics and baselines it measures, and the single sources of truth (schema, help, docs).

Most tests run the CLI in-process with the runner replaced by a fake (this is about the bench's bookkeeping, not
timing); the compute tests share one compiled batch; one test runs the real CLI in subprocesses, SIGKILLs it
mid-batch and resumes it.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from scripts.bench import bench_null_moe, docs, report, runner, schema, store, timer, wandb_log
from scripts.bench.config import BenchConfig, BenchConfigError, ShapeConfig, WandbConfig
from scripts.bench.points import Point, expand
from tests.wandb_records import read_wandb_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tokens", "64", "--hidden", "16", "--mlp_dim", "32", "--experts", "4", "--topk", "2", "--warmup", "0",
        "--iters", "1", "--wandb.mode", "disabled", "--host_malloc", "default"]  # in-process: never re-exec


def _cfg(tmp_path, **kw) -> BenchConfig:
    base = dict(tokens=64, hidden=16, mlp_dim=32, experts=4, topk=2, warmup=0, iters=1, plots=False,
                out_dir=str(tmp_path / "out"), wandb=WandbConfig(enabled=False))
    base.update(kw)
    return BenchConfig(**base)


def _fake_results(points) -> list[runner.PointResult]:
    out = []
    for pt in points:
        tk = pt.tokens * pt.topk
        null = int(round(pt.null_target * tk))
        per = [(tk - null) // pt.experts] * pt.experts
        per[0] += (tk - null) - sum(per)
        counts = runner.RoutingCounts(tk - null, null, tuple(per), None)
        t = 0.01 * (1 - pt.null_target) + 0.001
        out.append(runner.PointResult(pt, "fake", counts, timer.Timing((t,) * pt.iters, (0,) * pt.iters),
                                      timing="interleaved" if len(points) > 1 else "sequential"))
    return out


@pytest.fixture
def fake_runner(monkeypatch):
    """runner.run_batch replaced: records the batches it was given, returns fake results."""
    calls: list[list[Point]] = []

    def run_batch(points):
        calls.append(list(points))
        return _fake_results(points)

    monkeypatch.setattr(runner, "run_batch", run_batch)
    return calls


@pytest.fixture
def no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compute started on bad input")

    monkeypatch.setattr(runner, "run_batch", boom)


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- mistakes: one line, exit 2, nothing computed, nothing written ---------------------------------------------------


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    """The CLI gives expert-parallel sweeps simulated devices through XLA_FLAGS; in-process calls must not leak
    that into later tests' subprocesses."""
    if "XLA_FLAGS" in os.environ:
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)


def _cli_error(capsys, args, tmp_path) -> str:
    import jax

    jax.devices()  # JAX already running in this process with its one device, as in any in-process call
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        bench_null_moe.main(TINY + ["--out_dir", str(out_dir)] + args)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert not out_dir.exists()
    return err[len("error: "):].strip()


# Each case: the flags, and how the one error line starts. A flag of the wrong type or name:
PARSE_ERRORS = """
--tokens abc                              | tokens: Couldn't parse 'abc'
--tokenz 3                                | unknown option --tokenz (did you mean --tokens?)
--shapes [{tokenz: 64}]                   | shapes[0]: unknown field tokenz (did you mean tokens?)
--config_path /nonexistent/bench.yaml     | config_path: no such file: /nonexistent/bench.yaml
"""
# a choice that is not one (draccus, from the Literal types):
CHOICE_ERRORS = """
--impl [null_moe,magic]                   | impl[1]: must be one of [null_moe, masked_null, stock_levanter, null_moe_ep, compact_psum], got 'magic'
--ep_transport ring                       | ep_transport: must be one of [auto, all_to_all, ragged_all_to_all]
--dtype float16                           | dtype: must be one of [float32, bfloat16]
--routing random                          | routing: must be one of [forced, learned]
--null_routing_mode sometimes             | null_routing_mode: must be one of
--backend cuda                            | backend: must be one of
--wandb.mode onlin                        | wandb.mode: must be one of [offline, online, disabled], got 'onlin'
"""
# a value the layer's config rejects, named where it came from, or one the bench itself needs:
VALUE_ERRORS = """
--experts 2 --topk_list [1,4]             | topk_list[1]: topk must be in [1, experts=2], got 4
--topk 5                                  | topk must be in [1, experts=4], got 5
--shapes [{tokens: 64, hidden: -1}]       | shapes[0].hidden: hidden must be
--null_route_frac_list [0.0,1.5]          | null_route_frac_list[1]: null_route_frac must be in [0, 1)
--null_route_frac nan                     | null_route_frac must be in [0, 1), got nan
--tile_rows 12                            | tile_rows must be a positive multiple of 8
--iters 0                                 | iters: must be an integer >= 1
--tokens 0                                | tokens: must be an integer >= 1
--impl [stock_levanter] --null_route_frac 0.5 | impl: the sweep is empty
--tokens 4096 --max_memory_gb 0.001       | tokens: shape 4096x16x32x4 with topk=2
--impl [null_moe_ep] --ep_size 3          | ep_size: experts=4 must be divisible by ep_size=3
--impl [compact_psum] --ep_size 0         | ep_size: must be an integer >= 1, got 0
--impl [null_moe_ep] --ep_size 2 --capacity_factor 0 | capacity_factor must be a finite number > 0
--impl [null_moe_ep] --ep_size 2          | ep_size: 2 devices needed, this process has 1
"""


def _cases(table: str):
    for line in table.strip().splitlines():
        flags, start = (part.strip() for part in line.split("|"))
        args = flags.split(" --")
        yield pytest.param([a for arg in args for a in (arg if arg.startswith("--") else "--" + arg).split(" ", 1)],
                           start, id=flags)


@pytest.mark.parametrize("args, start", [*_cases(PARSE_ERRORS), *_cases(CHOICE_ERRORS), *_cases(VALUE_ERRORS)])
def test_bad_input_is_one_line_before_compute(capsys, tmp_path, no_compute, args, start):
    assert _cli_error(capsys, args, tmp_path).startswith(start)


def test_bad_yaml_files(capsys, tmp_path, no_compute):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokens: [1\n")
    assert _cli_error(capsys, ["--config_path", str(bad)], tmp_path).startswith("config_path: not valid YAML")
    typo = tmp_path / "typo.yaml"
    typo.write_text("tokens: 64\nnull_route_frac_lst: [0.5]\n")
    msg = _cli_error(capsys, ["--config_path", str(typo)], tmp_path)
    assert msg == "config_path: unknown field null_route_frac_lst (did you mean null_route_frac_list?)"


def test_bad_outputs(capsys, tmp_path, no_compute):
    afile = tmp_path / "afile"
    afile.write_text("")
    tiny = TINY + ["--out_dir"]

    def err(args):
        with pytest.raises(SystemExit) as exc:
            bench_null_moe.main(tiny + args)
        assert exc.value.code == 2
        out, e = capsys.readouterr()
        assert out == "" and e.count("\n") == 1
        return e

    assert err([str(afile)]).startswith("error: out_dir: ")
    assert "is not a directory" in err([str(afile / "sub")])
    assert "out_dir: cannot write in /proc" in err(["/proc/null_moe_bench"])
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.csv").write_text("a,b\n1,2\n")
    assert "has another column layout (2 columns, column 1 is 'a' where this bench writes 'shape')" in err([str(other)])
    (tmp_path / "dir" / "results.csv").mkdir(parents=True)
    msg = err([str(tmp_path / "dir")])
    assert msg.startswith("error: csv_name: ") and "is not a file" in msg
    assert (other / "results.csv").read_text() == "a,b\n1,2\n" and not (tmp_path / "afile" / "sub").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_unwritable_csv(capsys, tmp_path, no_compute):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "results.csv").write_text(",".join(schema.NAMES) + "\n")
    os.chmod(out / "results.csv", 0o444)
    with pytest.raises(SystemExit):
        bench_null_moe.main(TINY + ["--out_dir", str(out)])
    assert "csv_name: cannot read and append" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    for args in (["--tokens", "abc"], ["--impl", "[null_moe,magic]"]):
        cmd = [sys.executable, "scripts/bench/bench_null_moe.py", *args, "--out_dir", str(tmp_path / "o")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "o").exists()


def test_python_api_checks_like_the_cli(tmp_path, no_compute):
    for kw, start in [(dict(impl=["null_moe", "fused"]), "impl[1]: must be one of"), (dict(tokens="x"), "tokens:"),
                      (dict(shapes=[ShapeConfig(tokens=64, hidden=16, mlp_dim=32, experts=2)], topk_list=[1, 4]),
                       "topk_list[1]: topk must be in [1, experts=2]")]:
        with pytest.raises(BenchConfigError) as err:
            bench_null_moe.run(_cfg(tmp_path, **kw))
        assert str(err.value).startswith(start), str(err.value)
    assert not (tmp_path / "out").exists()


def test_help_documents_every_field_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.bench_null_moe", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for f in dataclasses.fields(BenchConfig):
        if f.name == "wandb":
            continue
        help_text = " ".join(f.metadata["help"].split())
        assert f"--{f.name} " in text and help_text in text, f.name
        after = text.split(help_text, 1)[1]
        assert after.lstrip().startswith("(default:"), f.name
    for f in dataclasses.fields(WandbConfig):
        assert f"--wandb.{f.name} " in text and " ".join(f.metadata["help"].split()) in text, f.name


# --- rows: durable, resumable, torn rows repaired ---------------------------------------------------------------------


def test_result_printed_only_after_its_row_is_durable(tmp_path, monkeypatch, fake_runner, capsys):
    """Each RESULT line is printed after its row was written, flushed and fsynced: at every fsync of the CSV the
    file is read back from disk (a fresh open), and a RESULT line may name only a point whose row an fsync saw."""
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.5])
    csv_path = os.path.join(cfg.out_dir, cfg.csv_name)
    durable, printed = set(), []
    real_fsync, real_out = os.fsync, bench_null_moe._out

    def fsync(fd):
        real_fsync(fd)
        if os.path.exists(csv_path) and os.path.samestat(os.fstat(fd), os.stat(csv_path)):
            durable.update(r["point_key"] for r in store.ResultsCSV(csv_path).read())

    def out(msg=""):
        if msg.startswith("RESULT "):
            key = schema.parse_result_line(msg)["point_key"]
            assert key in durable, f"RESULT for {key} printed before its row was fsynced"
            printed.append(key)
        real_out(msg)

    monkeypatch.setattr(store.os, "fsync", fsync)
    monkeypatch.setattr(bench_null_moe, "_out", out)
    rows = bench_null_moe.run(cfg)
    assert len(printed) == 2 and sorted(printed) == sorted(r["point_key"] for r in rows)
    assert capsys.readouterr().out.count("RESULT ") == 2


def test_progress_lines_on_stderr(tmp_path, fake_runner, capsys):
    bench_null_moe.run(_cfg(tmp_path, null_route_frac_list=[0.0, 0.3, 0.6]))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == ["[1/3", "[2/3", "[3/3"]
    assert all("tokens/s" in ln and "elapsed, eta" in ln for ln in lines) and "[1/3" not in out
    assert out.count("RESULT ") == 3


def test_older_csv_layout_is_upgraded_in_place_and_resumed(tmp_path, fake_runner, capsys):
    """A CSV written before the expert-parallel columns: its rows keep their values, gain the old-row defaults
    (one device, nothing sent or dropped) and count as done; the new points run."""
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.5])
    bench_null_moe.run(cfg)
    path = os.path.join(cfg.out_dir, cfg.csv_name)
    new_rows = _csv_rows(path)
    old_names = [n for n in schema.NAMES if n not in schema.ADDED_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old_names)
        for r in new_rows:
            w.writerow([r[n] for n in old_names])
    fake_runner.clear()
    rows = bench_null_moe.run(dataclasses.replace(cfg, null_route_frac_list=[0.0, 0.5, 0.9]))
    assert [p.null_target for batch in fake_runner for p in batch] == [0.9]
    with open(path, newline="") as f:
        assert tuple(next(csv.reader(f))) == schema.NAMES
    upgraded = _csv_rows(path)
    assert len(upgraded) == 3
    for old, new in zip(new_rows, upgraded):
        assert all(new[n] == old[n] for n in old_names)
        assert {n: new[n] for n in schema.ADDED_COLUMNS} == schema.ADDED_COLUMNS
    assert [r["dropped_frac"] for r in rows] == [0.0, 0.0, 0.0] and rows[0]["ep_size"] == 1


def test_torn_last_row_is_repaired_on_resume(tmp_path, fake_runner, capsys):
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.3, 0.6, 0.9])
    bench_null_moe.run(cfg)
    path = os.path.join(cfg.out_dir, cfg.csv_name)
    data = open(path, "rb").read()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "wb") as f:  # a crash in the middle of writing the last row (its timestamp cut short)
        f.write(data[: len(data) - 12])
    torn_key = schema.typed(dict(zip(schema.NAMES, next(csv.reader([data[last:].decode()])))))["point_key"]
    assert torn_key not in store.ResultsCSV(path).done_keys()
    fake_runner.clear()
    capsys.readouterr()
    rows = bench_null_moe.run(cfg)
    assert [p.key for batch in fake_runner for p in batch] == [torn_key]  # measured again, nothing else
    raw = _csv_rows(path)
    assert len(raw) == 4 and len({r["point_key"] for r in raw}) == 4 and all(r["timestamp"] for r in raw)
    assert open(path, "rb").read().endswith(b"\n") and len(rows) == 4


def test_crash_keeps_finished_batches_and_resume_runs_the_rest(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.3, 0.6, 0.9], topk_list=[1, 2])
    batches = []

    def crashing(points):
        batches.append([p.topk for p in points])
        if len(batches) == 2:
            raise RuntimeError("simulated crash in batch 2")
        return _fake_results(points)

    monkeypatch.setattr(runner, "run_batch", crashing)
    with pytest.raises(RuntimeError, match="batch 2"):
        bench_null_moe.run(cfg)
    assert batches == [[1, 1, 1, 1], [2, 2, 2, 2]]
    rows = _csv_rows(os.path.join(cfg.out_dir, cfg.csv_name))
    assert [(r["topk"], r["null_target"], r["timing"]) for r in rows] == [("1", t, "interleaved")
                                                                         for t in ("0.0", "0.3", "0.6", "0.9")]
    batches.clear()
    monkeypatch.setattr(runner, "run_batch", lambda pts: (batches.append(len(pts)), _fake_results(pts))[1])
    capsys.readouterr()
    rows = bench_null_moe.run(cfg)
    out = capsys.readouterr().out
    assert batches == [4] and len(rows) == 8 and out.count("SKIP ") == 4 and out.count("RESULT ") == 4
    assert "gain" in out  # the table covers resumed points too
    batches.clear()
    bench_null_moe.run(dataclasses.replace(cfg, iters=2))  # another measurement: everything again
    assert batches == [4, 4]


def test_interleave_off_runs_points_alone(tmp_path, fake_runner):
    bench_null_moe.run(_cfg(tmp_path, null_route_frac_list=[0.0, 0.5], interleave=False))
    assert [len(b) for b in fake_runner] == [1, 1]


# --- W&B --------------------------------------------------------------------------------------------------------------


def test_wandb_online_needs_credentials(tmp_path, monkeypatch, capsys, no_compute):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    msg = _cli_error(capsys, ["--wandb.mode", "online"], tmp_path)
    assert msg.startswith("wandb.mode: online needs W&B credentials") and "wandb login" in msg
    monkeypatch.setenv("WANDB_MODE", "online")  # the environment's mode is checked the same way
    assert _cli_error(capsys, ["--wandb.mode", "null"], tmp_path).startswith("wandb.mode: online needs")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert wandb_log.preflight(_cfg(tmp_path, wandb=WandbConfig(mode="online"))) == "online"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(BenchConfigError, match=r"^wandb.mode: \$WANDB_MODE='sometimes'"):
        wandb_log.preflight(_cfg(tmp_path, wandb=WandbConfig()))


def test_failed_wandb_runs_are_logged_by_the_next_run(tmp_path, monkeypatch, fake_runner, capsys):
    import wandb

    cfg = _cfg(tmp_path, null_route_frac_list=[0.0, 0.5], wandb=WandbConfig(mode="offline", group="g"))
    real_init = wandb.init

    def down(*a, **k):
        raise ConnectionError("W&B is unreachable")

    monkeypatch.setattr(wandb, "init", down)
    bench_null_moe.run(cfg)
    err = capsys.readouterr().err
    assert err.count("WARNING: W&B run for") == 2 and "a rerun will log it" in err
    ledger = wandb_log.Ledger(cfg.out_dir)
    assert ledger.logged("offline") == set()

    monkeypatch.setattr(wandb, "init", real_init)
    fake_runner.clear()
    rows = bench_null_moe.run(cfg)
    assert fake_runner == []  # nothing computed: the rows came from the CSV
    assert ledger.logged("offline") == {r["point_key"] for r in rows}
    for line in open(ledger.path):
        key, mode, run_id = line.split()
        (run_dir,) = glob.glob(os.path.join(cfg.out_dir, "wandb", f"*-{run_id}"))
        rec = read_wandb_records(run_dir)
        row = next(r for r in rows if r["point_key"] == key)
        assert rec["config"]["null_route_frac"] == row["null_target"] and rec["run"]["group"] == "g"
        assert rec["summary"]["tokens_per_s"] == pytest.approx(row["tokens_per_s"])
        assert rec["summary"]["expert_load"]["_type"] == "histogram"
    fake_runner.clear()
    bench_null_moe.run(cfg)  # all logged: no new runs
    assert len(open(ledger.path).readlines()) == 2


# --- what is measured ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forced_batch(tmp_path_factory):
    """One compiled step, every fraction and mode (forced routing, T k = 16384)."""
    cfg = _cfg(tmp_path_factory.mktemp("b"), tokens=4096, hidden=8, mlp_dim=16, experts=8, topk=4,
               bench_pass="forward", null_route_frac_list=[0.0, 0.1, 0.5, 0.9], null_routing_mode="both", iters=2)
    pts = expand(cfg)
    assert len(runner.batches(pts, True)) == 1
    return pts, runner.run_batch(pts)


def test_forced_statistics_match_routing_counted_here(forced_batch):
    """The counts the bench reads from the layer's statistics equal a count of the expert ids that
    layer.route_forced gives for the same key, and the realized fraction is within 0.01 of the target."""
    import jax

    from scripts.bench import impls
    from scripts.bench.points import forced_layer_config

    pts, results = forced_batch
    layer, x = impls.build_layer(forced_layer_config(pts[0]), pts[0].seed, pts[0].tokens, pts[0].dtype)
    for pt, res in zip(pts, results):
        routing = layer.route_forced(x, key=jax.random.PRNGKey(pt.seed + 1), null_frac=pt.null_target,
                                     mode=pt.null_mode if pt.null_target else "independent")
        ids = np.asarray(routing.expert_ids)
        real = ids < pt.experts
        assert res.counts.real == real.sum() and res.counts.null == (~real).sum()
        assert res.counts.per_expert == tuple(np.bincount(ids[real], minlength=pt.experts))
        assert res.counts.per_token == tuple(np.bincount(real.sum(1), minlength=pt.topk + 1))
        assert abs(res.counts.null / ids.size - pt.null_target) <= 0.01
        assert res.backend == "tiled" and res.timing == "interleaved" and len(res.main.times) == 2
        row = schema.make_row(res, sweep="s", timestamp="t", host_malloc="default")
        assert row["null_realized"] == res.counts.null / ids.size
        assert row["experts_per_token"] == pytest.approx(real.sum() / pt.tokens)


def test_masked_null_computes_null_moe_output_the_long_way():
    """masked_null's null slots reach a real expert, with weight 0: same output and gradients as null_moe."""
    import jax

    from scripts.bench import impls
    from scripts.bench.points import forced_layer_config

    pt = expand(BenchConfig(tokens=256, hidden=16, mlp_dim=32, experts=4, topk=2, null_route_frac=0.5))[0]
    layer, x = impls.build_layer(forced_layer_config(pt), 0, pt.tokens, pt.dtype)
    mask = impls.draw_null_mask(0, pt.tokens, pt.topk, 0.5, "independent")
    routing = layer.route_forced(x, null_mask=mask)
    masked = impls._masked(layer, x, routing)
    assert not np.any(np.asarray(masked.expert_ids) == pt.experts)
    assert np.all(np.asarray(masked.weights)[np.asarray(mask)] == 0)
    outs = {}
    for impl in ("null_moe", "masked_null"):
        fwd, fwd_bwd, params = impls.make_steps(impls.forced_forward(impl), layer, with_aux=False)
        (loss, grads), stats = jax.jit(fwd_bwd)(params, x, mask)
        outs[impl] = (loss, jax.tree_util.tree_leaves(grads), stats)
    (l0, g0, s0), (l1, g1, s1) = outs["null_moe"], outs["masked_null"]
    assert l0 == pytest.approx(float(l1), rel=1e-5)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for k in s0:  # the statistics are those of the null routing in both
        np.testing.assert_array_equal(np.asarray(s0[k]), np.asarray(s1[k]))


def test_learned_routing_measures_modes_only_where_the_flag_matters(tmp_path):
    cfg = _cfg(tmp_path, tokens=256, experts=16, topk=4, routing="learned", null_routing_mode="both",
               null_route_frac_list=[0.0, 0.1, 0.5])
    # M = round(16 p / (1 - p)): p=0.1 -> 2 < k (both modes); p=0.5 -> 16 >= k (one point, "learned")
    assert [(p.null_target, p.null_mode) for p in expand(cfg)] == [
        (0.0, "learned"), (0.1, "independent"), (0.1, "take_until_null"), (0.5, "learned")]
    forced = expand(dataclasses.replace(cfg, routing="forced"))
    assert [(p.null_target, p.null_mode) for p in forced] == [
        (0.0, "independent"), (0.1, "independent"), (0.5, "independent"), (0.1, "take_until_null"),
        (0.5, "take_until_null")]


def test_learned_point_runs_the_layers_router(tmp_path):
    cfg = _cfg(tmp_path, tokens=512, hidden=16, mlp_dim=32, experts=8, topk=2, bench_pass="forward",
               null_route_frac=0.5, routing="learned")
    (pt,) = expand(cfg)
    (res,) = runner.run_batch([pt])
    assert pt.null_mode == "learned" and res.timing == "sequential" and res.backend == "tiled"
    assert res.counts.real + res.counts.null == 512 * 2 and 0 < res.counts.null < 1024
    assert sum(res.counts.per_expert) == res.counts.real and sum(res.counts.per_token) == 512


# --- one source of truth -------------------------------------------------------------------------------------------


def test_docs_tables_are_generated_from_the_code():
    with open(docs.DOC) as f:
        text = f.read()
    assert docs.render(text) == text, "docs/BENCH.md is stale: run python -m scripts.bench.docs"


def test_row_roundtrips_through_result_line_and_csv(tmp_path):
    pt = expand(BenchConfig(tokens=64, hidden=16, mlp_dim=32, experts=4, topk=2, null_route_frac=0.5))[0]
    row = schema.make_row(_fake_results([pt])[0], sweep="sw", timestamp="2026-01-01T00:00:00+00:00",
                          host_malloc="resident")
    parsed = schema.parse_result_line(schema.result_line(row))
    assert list(parsed) == [c.name for c in schema.COLUMNS if c.in_result]
    assert parsed["time_fwd_s"] == "-" and parsed["renormalize"] == "true"
    assert float(parsed["tflops"]) == pytest.approx(6 * 16 * 32 * 3 * 64 / row["time_s"] / 1e12, rel=1e-5)
    csv_store = store.ResultsCSV(str(tmp_path / "r.csv"))
    csv_store.open()
    csv_store.append(row)
    (back,) = csv_store.read()
    assert back.keys() == row.keys()
    for k, v in row.items():
        assert back[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, list) else v), k
    config, summary, vectors = schema.wandb_split(row)
    assert config["bench_pass"] == "forward_backward" and config["split_forward_backward"] is False
    assert "time_fwd_s" not in summary and set(vectors) == {"expert_load"}


def test_yaml_configs_parse_and_expand():
    from scripts.bench.config import parse

    for name in ("seed_matrix", "cpu_matrix", "cpu_ep"):
        pts = expand(parse(["--config_path", os.path.join(ROOT, "configs", "bench", f"{name}.yaml")]))
        if name == "seed_matrix":
            assert {p.shape for p in pts} == {"32768x2048x1408x60", "32768x2048x2048x64", "65536x3072x3072x128"}
            assert {p.topk for p in pts} == {2, 4, 8} and {p.dtype for p in pts} == {"bfloat16"}
        elif name == "cpu_ep":
            assert len(pts) == 2 * 3 * 3 and {p.ep_size for p in pts if p.ep} == {8}
            assert {p.capacity_factor for p in pts if p.impl == "null_moe_ep"} == {1.25}
        else:
            assert len(pts) == 182
            anchor = [p for p in pts if p.shape == "4096x512x1024x16" and p.topk == 4 and p.impl == "null_moe"]
            assert {p.null_target for p in anchor} == {0.0, 0.5, 0.9} and all(p.split for p in anchor)


def test_plot_series_has_ideal_curve_and_baselines(tmp_path, fake_runner):
    rows = bench_null_moe.run(_cfg(tmp_path, null_route_frac_list=[0.0, 0.5, 0.9],
                                   impl=["null_moe", "masked_null", "stock_levanter"]))
    (panels,) = report.plot_series(rows).values()
    series = {s["kind"]: s for s in panels["independent"]}
    assert set(series) == {"null_moe", "masked_null", "ideal", "stock"}
    y0 = series["null_moe"]["y"][0]
    assert series["ideal"]["y"][-1] == pytest.approx(y0 / (1 - 0.9))
    stock = next(r for r in rows if r["impl"] == "stock_levanter")
    assert series["stock"]["y"] == [stock["tokens_per_s"]] * 2 and series["stock"]["x"] == [0.0, 0.9]
    assert "vs_stock" in report.summary_table(rows)
    paths = report.make_plots(rows, str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in paths] == ["tokens_per_s_64x16x32x4.png"]


# --- the real CLI: killed mid-batch, resumed --------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_killed_mid_batch_then_resumed(tmp_path):
    """SIGKILL while the second batch is being timed: the first batch's rows are in the CSV and nothing else; the
    rerun measures only what is missing, logs W&B runs for every point (the killed run had W&B off) and
    writes the plots; a third run has nothing to do."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "scripts.bench.bench_null_moe", "--tokens", "128", "--hidden", "16", "--mlp_dim", "32",
           "--experts", "4", "--topk", "1", "--null_route_frac_list", "[0.0,0.5]", "--null_routing_mode", "both",
           "--impl", "[null_moe,masked_null,stock_levanter]", "--split_forward_backward", "true", "--warmup", "0",
           "--iters", "2", "--out_dir", str(out), "--wandb.group", "tiny", "--wandb.tags", "[test]"]
    env = dict(os.environ, WANDB_SILENT="true", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd + ["--wandb.mode", "disabled"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("RESULT ")
        if seen == 3:  # the first batch (null_moe: 3 points) is done; masked_null's batch starts compiling
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert seen == 3, "the first batch did not finish"
    rows = _csv_rows(out / "results.csv")
    assert [r["impl"] for r in rows] == ["null_moe"] * 3

    proc2 = subprocess.run(cmd + ["--wandb.mode", "offline"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    lines = [schema.parse_result_line(ln) for ln in proc2.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc2.stdout.count("SKIP ") == 3 and [r["impl"] for r in lines] == ["masked_null"] * 3 + ["stock_levanter"]
    assert "logging 3 finished point(s) to W&B" in proc2.stdout and "[7/7]" in proc2.stderr
    rows = _csv_rows(out / "results.csv")
    assert len(rows) == 7 and len({r["point_key"] for r in rows}) == 7
    for r in lines:
        assert r["host_malloc"] == "resident" and float(r["time_fwd_s"]) > 0
        assert r["backend"] == ("levanter:ragged_dot" if r["impl"] == "stock_levanter" else "tiled")
        assert r["timing"] == ("sequential" if r["impl"] == "stock_levanter" else "interleaved")
    assert {os.path.basename(p) for p in glob.glob(str(out / "*.png"))} == {
        "tokens_per_s_128x16x32x4.png", "time_split_128x16x32x4.png"}
    ledger = wandb_log.Ledger(str(out))
    assert ledger.logged("offline") == {r["point_key"] for r in rows}
    run_id = open(ledger.path).readline().split()[2]
    rec = read_wandb_records(glob.glob(str(out / "wandb" / f"*-{run_id}"))[0])
    assert rec["run"]["group"] == "tiny" and "test" in rec["run"]["tags"] and rec["exit_code"] == 0

    proc3 = subprocess.run(cmd + ["--wandb.mode", "offline"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert proc3.returncode == 0 and "RESULT " not in proc3.stdout and proc3.stdout.count("SKIP ") == 7
    assert len(open(ledger.path).readlines()) == 7


def test_timer_warms_up_then_interleaves_rounds():
    order = []
    calls = [lambda i=i: (order.append(i), i)[1] for i in range(3)]
    timings = timer.interleaved(calls, warmup=2, rounds=3, keep=lambda out: out * 10, compile_s=[1.5])
    assert order == [0, 0, 1, 1, 2, 2] + [0, 1, 2] * 3
    assert [len(t.times) for t in timings] == [3, 3, 3] and [t.kept for t in timings] == [0, 10, 20]
    assert [t.compile_s for t in timings] == [1.5, 0.0, 0.0]
    t = timer.Timing((3.0, 1.0, 2.0), (5, 1, 9))
    assert (t.median, t.min, t.max, t.median_faults) == (2.0, 1.0, 3.0, 5)


def test_a_run_whose_record_never_lands_is_not_counted_logged(tmp_path, monkeypatch, capsys):
    """log_row adds a point to the ledger only once the run's local record holds its exit; without it (here: the
    record never appears) the point stays unlogged and a rerun logs it."""
    assert wandb_log._written(str(tmp_path), "nosuchrun", 0.1) is False
    monkeypatch.setattr(wandb_log, "_written", lambda out_dir, run_id, timeout_s: False)
    cfg = _cfg(tmp_path, null_route_frac_list=[0.0], wandb=WandbConfig(mode="offline", group="g"))
    row = {"shape": "8x4x4x2", "topk": 1, "impl": "null_moe", "null_mode": "independent", "null_target": 0.0,
           "point_key": "k0", "tokens_per_s": 1.0}
    monkeypatch.setattr(wandb_log.schema, "wandb_split", lambda r: ({"null_route_frac": 0.0}, {"tokens_per_s": 1.0}, {}))
    assert wandb_log.log_row(cfg, row, "g", "offline") is None
    assert "record was not on disk" in capsys.readouterr().err
    assert wandb_log.Ledger(cfg.out_dir).logged("offline") == set()
