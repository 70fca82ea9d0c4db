"""Test-session settings.

The suite compiles hundreds of small programs on 2 CPU cores, where XLA's LLVM
backend optimisation dominates the time; the tests check numerics and
structure, not speed, so they run with backend optimisation level 0 (HLO
passes, fusion and numerics are unchanged; benchmarks never use this).
Subprocess tests set their own XLA_FLAGS.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
