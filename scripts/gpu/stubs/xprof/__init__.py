"""An import-only stand-in for xprof, for the GPU check machine only (see scripts/gpu/README.md).

tokamax imports ``xprof.cli.tools`` for its own benchmarking helpers, which this project never calls; xprof itself
is not on the GPU image. Installed only where ``import xprof`` fails.
"""

IS_NULL_MOE_STUB = True
