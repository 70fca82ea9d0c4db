"""Test-session settings.

The suite compiles hundreds of small programs on 2 CPU cores, where XLA's LLVM
backend optimisation dominates the time; the tests check numerics and
structure, not speed, so they run with backend optimisation level 0 (HLO
passes, fusion and numerics are unchanged; benchmarks never use this).
Subprocess tests set their own XLA_FLAGS.
"""

import os

import pytest

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()



@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF (see tests/smollm2.py)."""
    from tests import smollm2

    return smollm2.gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """transformers' float32 reading of that GGUF as a Hugging Face directory, built once per venv."""
    from tests import smollm2

    return smollm2.hf_dir()


@pytest.fixture(scope="session")
def smollm2_jaxar(smollm2_hf_dir):
    """(config, params) of SmolLM2 loaded by jaxar from the HF directory, once per test worker."""
    import jaxar

    return jaxar.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_hf_dir):
    """The transformers reference model (float32, eval), once per test worker."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
