"""Does null routing pay at matched compute? The quality study: arms x seeds through the training CLI.

    python -m experiments.speedrun.null_quality --config_path configs/quality/cpu_study.yaml \\
        [--num_train_steps N] [--seeds "[0,1,2]"] [--out_dir DIR] [--max_eval_batches B] ...

Every arm x seed is one run of the documented training command (``python -m experiments.speedrun.custom_mixtral
--config_path <base_config> ...``, a subprocess) with the same base config, token budget, optimizer, aux-loss
weights, evaluation batches and, per seed, the same initial weights and data order; arms differ only in
``model.num_experts_per_tok`` (k), ``model.null_route_frac`` (p) and an arm's own ``model`` overrides. Each run is
an (offline by default) W&B run in the group ``<name>`` with the id ``<name>-<arm>-s<seed>``, written under
``DIR/runs/<run id>/``; the study reads its metrics back from that run's ``.wandb`` file. It writes:

- ``DIR/results.csv``: one row per arm x seed (final held-out eval loss, expected and realized real experts per
  token, null / all-null fractions, load spread, train tokens, data-order fingerprint, wall time, ...). A run is
  done once its row is in the file (the file is rewritten atomically: temp file, fsync, rename). A rerun skips done
  runs; a run that crashed or was interrupted is started again from scratch (its partial W&B run and checkpoints are
  removed first), so every row comes from one uninterrupted run. Rows whose ``study_hash`` (a hash of everything
  that defines the run except arm and seed) differs from the current config stop the study with an error: use
  another ``--out_dir``.
- ``DIR/summary.md``: per arm mean +- std (over seeds) of the final eval loss and of realized experts per token;
  for each null arm, the paired (same seed) difference against its matched-expected-compute baseline with the
  verdict (win only if the mean difference is below zero by more than twice its std; loss if above zero by more
  than twice its std; else tie), at realized compute too when the realized experts per token are more than
  ``realized_tolerance`` off the target; the share of the k_low -> k_high bracket gap each arm recovers; the
  bracket gap against the seed noise.
- ``DIR/eval_loss_vs_step.png`` (mean over seeds per arm) and ``DIR/eval_loss_vs_experts.png`` (final eval loss
  vs expected real experts per token; hollow markers at the realized value). ``DIR/runs/<id>/metrics.json`` holds
  each run's eval and train-loss curves.

Data order: Levanter's ``train_lm`` draws the training order from ``data_seed`` (set to the run's seed here), the
data config, ``seq_len`` and the batch size only, never from the model, so every arm of a seed sees the same
batches; ``data_fingerprint`` in the CSV is a hash of the first and last training batch of each run, computed from
the run's own parsed config. The initial weights are the same too: ``trainer.seed`` is the run's seed and the
parameter shapes do not depend on k or p (the null gate exists at p = 0 too).

Order and time budget: runs go seed by seed, the arms in their listed order within a seed (list them in order of
importance). With ``time_budget_s`` a run predicted not to finish inside the budget (counted from the start of this
command) is not started, and one still going at its end is stopped; summary.md lists them as cut, and the study
exits 0 with what it has (``scripts/gpu/quality_check.sh`` runs the GPU study so).

Exit codes: 0 done (or cut by the time budget), 1 a run failed (finished rows are kept; rerun to continue), 2
configuration error (one ``error: ...`` line naming the field, before any compute).

The code: ``experiments/speedrun/quality/`` (``config``, ``runner``, ``results``, ``stats``, ``report``, ``plots``);
this module is the command line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from experiments.speedrun.quality.config import Arm, ConfigError, QualityConfig, one_line, parse_config
from experiments.speedrun.quality.report import summary_markdown, write_outputs
from experiments.speedrun.quality.results import RESULT_COLUMNS, load_results
from experiments.speedrun.quality.runner import EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_OK, run_study
from experiments.speedrun.quality.stats import summarize, verdict

__all__ = [
    "Arm",
    "ConfigError",
    "EXIT_CONFIG_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "QualityConfig",
    "RESULT_COLUMNS",
    "load_results",
    "main",
    "parse_config",
    "run_study",
    "summarize",
    "summary_markdown",
    "verdict",
    "write_outputs",
]

_STARTED = time.time()  # the time budget counts from here (the command's start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    started = _STARTED if argv is None else time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = parse_config(args)
        return run_study(cfg, started=started)
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
