"""Helpers shared by the Pallas kernel tests."""

import functools

import jax
import numpy as np

ON_GPU = jax.default_backend() == "gpu"


def _x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is not None:
    return ctx(True)
  from jax.experimental import enable_x64  # older jax
  return enable_x64()


def _run(fn, *args, **kwargs):
  """jit + run with XLA's backend optimisations off: interpret-mode kernels
  are tiny, and this halves the CPU compile time that dominates the tests."""
  jitted = jax.jit(functools.partial(fn, **kwargs))
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile({"xla_backend_optimization_level": 0})
  except Exception:  # option unknown to this jaxlib
    compiled = lowered.compile()
  return compiled(*args)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def triton_lowering_available():
  """Pallas' Triton lowering runs without a GPU on jaxlib <= 0.10.2; newer
  jaxlibs compile the Triton module during lowering (needs a GPU)."""
  try:
    from jax._src.lib import version as jaxlib_version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return ON_GPU or tuple(jaxlib_version) <= (0, 10, 2)


TRITON_SKIP_REASON = "Triton lowering needs jaxlib<=0.10.2 or a GPU"
