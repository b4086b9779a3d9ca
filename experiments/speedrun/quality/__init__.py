"""The quality study (``python -m experiments.speedrun.null_quality``), one concept per module:

- ``config``: the study's config (arms, seeds, budget), its validation and parsing;
- ``runner``: each run's training command, its data-order fingerprint, reading a finished run, the loop over
  arms x seeds (in order, within the time budget);
- ``results``: ``results.csv`` (columns, atomic rewrite);
- ``stats``: per-arm statistics, paired differences, verdicts, bracket-gap shares;
- ``report``: ``summary.md``;
- ``plots``: the two figures.
"""
