"""The training CLI's checks before anything starts (experiments/speedrun/preflight.py), and short runs.

- the learning-rate schedule: every shipped training config builds Levanter's schedule at 1, 2 and 4 steps (a
  fractional warmup); an absolute warmup at or above the step count, a decay or rewarmup that does not fit, and
  a warmup fraction that leaves a cosine no decay steps are one-line ``ConfigError``s naming the field;
- through the CLI: a 4-step run of ``tiny_cpu.yaml`` exits 0; ``--optimizer.warmup 10`` at 4 steps is one
  ``error:`` line, exit 2, and neither W&B nor the corpus was touched;
- devices: what a trainer mesh needs, and the one-line error when a platform has too few (a fake GPU with one
  device, and this process's CPU JAX in-process). The CPU re-execution with simulated devices runs end to end
  in tests/test_training_ep.py (tiny_cpu_ep.yaml without XLA_FLAGS).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from experiments.speedrun import preflight, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "speedrun", "tiny_cpu.yaml")
TINY_EP_YAML = os.path.join(ROOT, "configs", "speedrun", "tiny_cpu_ep.yaml")
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "speedrun", "*.yaml"))
                 + glob.glob(os.path.join(ROOT, "configs", "quality", "*base*.yaml")))
SMOKE_STEPS = 4
SMOKE_CORPUS_CHARS = 60_000  # about 20 k tokens: 4 steps of 16 x 128 need 8 k


def _tiny():
    return train.parse_config(["--config_path", TINY_YAML])


# --- learning-rate schedule ----------------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_build_their_schedule_at_any_step_count(path):
    config = train.parse_config(["--config_path", path])
    for steps in (1, 2, 4, int(config.trainer.num_train_steps)):
        preflight.check_lr_schedule(config.optimizer, steps)
        schedule = config.optimizer.lr_scheduler(steps)  # what Levanter builds; raised in optax before
        assert float(schedule(steps - 1)) > 0
    warmup = config.optimizer.warmup
    assert warmup <= 1, f"{path}: absolute warmup {warmup} (use a fraction so any step count works)"


@pytest.mark.fast
def test_quality_base_warmup_is_unchanged_at_the_studies_step_counts():
    """The base configs' fractional warmups give the warmup steps their absolute values gave (10 of 200)."""
    from levanter.optim.config import _convert_frac_or_steps

    cpu = train.parse_config(["--config_path", os.path.join(ROOT, "configs", "quality", "cpu_base.yaml")])
    assert _convert_frac_or_steps(cpu.optimizer.warmup, cpu.trainer.num_train_steps) == 10
    tiny = _tiny()
    assert _convert_frac_or_steps(tiny.optimizer.warmup, tiny.trainer.num_train_steps) == 10


@pytest.mark.fast
@pytest.mark.parametrize(
    "fields, steps, message",
    [
        (dict(warmup=10), 4, "optimizer.warmup=10 steps must be below trainer.num_train_steps=4"),
        (dict(warmup=4), 4, "optimizer.warmup=4 steps must be below trainer.num_train_steps=4"),
        (dict(warmup=1.0), 4, "optimizer.warmup=1 (a fraction: 4 of 4 steps) leaves no decay steps for lr_schedule "
                              "cosine"),
        (dict(decay=0.1), 4, "optimizer.decay=0.1 leaves no decay steps for lr_schedule cosine"),
        (dict(decay=5), 4, "optimizer.decay=5 (5 steps) plus warmup (0 steps) exceed the 4 steps"),
        (dict(warmup=2.5), 8, "optimizer.warmup must be a fraction in [0, 1] of the run or a whole number"),
        (dict(cycles=2, rewarmup=3), 4, "optimizer.rewarmup=3 steps must be below the 2 steps of the schedule in "
                                        "cycle 1"),
        (dict(cycles=3), 2, "optimizer: cycle 0 has 0 steps"),
        (dict(cooldown=4), 4, "optimizer.cooldown=4 leaves no steps"),
    ],
)
def test_schedule_errors_name_the_field(fields, steps, message):
    optimizer = dataclasses.replace(_tiny().optimizer, **fields)
    with pytest.raises(train.ConfigError) as info:
        preflight.check_lr_schedule(optimizer, steps)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.fast
def test_schedules_that_fit_pass():
    base = _tiny().optimizer
    for fields, steps in [(dict(warmup=3), 4), (dict(warmup=0.5), 2), (dict(warmup=1.0, lr_schedule="linear"), 4),
                          (dict(decay=0.5), 4), (dict(cycles=2, rewarmup=0.5), 8), (dict(warmup=0.05), 1)]:
        preflight.check_lr_schedule(dataclasses.replace(base, **fields), steps)


# --- devices -------------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_device_need_of_the_shipped_meshes():
    ep = train.parse_config(["--config_path", TINY_EP_YAML])
    need = preflight.device_need(ep.trainer, ep.cpu_devices)
    assert (need.per_slice, need.slices, need.cpu_devices) == (4, 1, 8)
    assert [n for n in range(1, 17) if need.fits(n)] == [4, 8, 12, 16]
    tiny = _tiny()
    assert tiny.cpu_devices is None
    assert preflight.device_need(tiny.trainer).cpu_devices == 1
    mp = dataclasses.replace(ep.trainer, replica_ici_axis_size=2, model_axis_size=3)
    assert preflight.device_need(mp).per_slice == 6
    with pytest.raises(train.ConfigError, match=r"cpu_devices=6 must be a multiple of 4 \(the trainer mesh: "
                                                r"replica_ici_axis_size=4 x model_axis_size=1\)"):
        preflight.device_need(ep.trainer, 6)


@pytest.mark.fast
def test_too_few_accelerator_devices_is_one_line_naming_needed_and_found():
    ep = train.parse_config(["--config_path", TINY_EP_YAML])
    need = preflight.device_need(ep.trainer, ep.cpu_devices)
    for count in (4, 8):
        preflight.check_devices(need, platform="gpu", device_count=count)
    for count, found in ((1, "found 1 gpu device"), (6, "found 6 gpu devices")):
        with pytest.raises(train.ConfigError) as info:
            preflight.check_devices(need, platform="gpu", device_count=count)
        assert str(info.value) == ("the trainer mesh needs a multiple of 4 devices per slice (replica_ici_axis_size=4 "
                                   f"x model_axis_size=1), {found}")
    two_slices = preflight.device_need(dataclasses.replace(ep.trainer, replica_dcn_axis_size=2))
    with pytest.raises(train.ConfigError, match="replica_dcn_axis_size=2 needs a multiple of 2 slices, found 1"):
        preflight.check_devices(two_slices, platform="tpu", device_count=8, num_slices=1)
    preflight.check_devices(two_slices, platform="tpu", device_count=8, num_slices=2)


@pytest.mark.fast
def test_xla_flag_device_count():
    assert preflight.flag_device_count(None) is None
    assert preflight.flag_device_count("--xla_cpu_foo=1") is None
    assert preflight.flag_device_count("--a=1 --xla_force_host_platform_device_count=8") == 8
    with pytest.raises(train.ConfigError):
        preflight.flag_device_count("--xla_force_host_platform_device_count=x")


@pytest.mark.fast
def test_in_process_main_with_too_few_cpu_devices_exits_2(capsys):
    """train.main(args) runs in this process (no re-exec): a mesh this process's CPU JAX cannot hold is one line
    that says how to get the devices, before any data or W&B."""
    import jax

    if jax.device_count() % 4 == 0:
        pytest.skip("this process already has a multiple of 4 devices")
    assert train.main(["--config_path", TINY_EP_YAML]) == train.EXIT_CONFIG_ERROR
    captured = capsys.readouterr()
    n = jax.device_count()
    assert captured.err.splitlines() == [
        f"error: the trainer mesh needs a multiple of 4 devices per slice (replica_ici_axis_size=4 x "
        f"model_axis_size=1), found {n} cpu device{'s' if n != 1 else ''}; set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"]
    assert captured.out == ""


# --- through the CLI -----------------------------------------------------------------------------------------------
def _cli(workdir, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    env.update(WANDB_DIR=str(workdir), WANDB_MODE="offline", WANDB_SILENT="true", JAX_PLATFORMS="cpu")
    for key in ("XLA_FLAGS", "NULL_MOE_HOST_MALLOC", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "experiments.speedrun.custom_mixtral", *args]
    return subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.fast
@pytest.mark.slow
def test_four_step_tiny_run_exits_0(tmp_path):
    """tiny_cpu.yaml as shipped (its optimizer and schedule) for 4 steps, on a small corpus: the training smoke of
    the fast tier. Before fractional warmups this died in optax after W&B had started."""
    from experiments.speedrun.local_data import build_corpus

    corpus = str(tmp_path / "corpus")
    build_corpus(corpus, max_chars=SMOKE_CORPUS_CHARS)
    proc = _cli(
        tmp_path, "--config_path", TINY_YAML, "--trainer.num_train_steps", str(SMOKE_STEPS), "--trainer.id", "short",
        "--data.tokenizer", os.path.join(corpus, "tokenizer"), "--data.cache_dir", os.path.join(corpus, "cache"),
        "--data.train_urls", f"[{os.path.join(corpus, 'train.jsonl')}]",
        "--data.validation_urls", f"[{os.path.join(corpus, 'validation.jsonl')}]",
        "--trainer.checkpointer.base_path", str(tmp_path / "ckpt"), "--trainer.steps_per_eval", "1000",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("step ") and " loss " in line]
    assert steps == [f"{s}/{SMOKE_STEPS}" for s in range(1, SMOKE_STEPS + 1)], proc.stdout[-3000:]


@pytest.mark.fast
def test_absolute_warmup_at_or_above_the_steps_is_exit_2_before_anything(tmp_path):
    proc = _cli(tmp_path, "--config_path", TINY_YAML, "--trainer.num_train_steps", "4", "--optimizer.warmup", "10",
                timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: optimizer.warmup=10 steps must be below trainer.num_train_steps=4 (a fraction such as 0.05 scales "
        "with the run)"]
    assert proc.stdout == ""  # not even the host allocator line
    assert sorted(os.listdir(tmp_path)) == []  # no W&B run dir, no corpus, no checkpoints, no logs
