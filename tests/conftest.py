"""Test-session settings.

The suite compiles hundreds of small programs on 2 CPU cores, where XLA's compile time dominates (a warm
compilation cache runs tests/test_speculative.py 3.7x faster); the tests check numerics and structure, not
speed, so they compile with TEST_XLA_FLAGS (benchmarks never use them):
- backend optimisation level 0 (LLVM's optimisation of the generated code);
- the classic loop emitters instead of XLA:CPU's MLIR fusion emitters, which take ~40% of the compile
  time of these tiny models (same HLO fusions, same numerics contract);
- one LLVM module per program instead of 32 split parts, since two test workers already fill the two cores.
Subprocess tests pass the same flags (os.environ["XLA_FLAGS"], set here before jax is imported).
"""

import os

import pytest

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_parallel_codegen_split_count=1")
_have = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_have] + [f for f in TEST_XLA_FLAGS.split()
                                              if f.split("=")[0] not in _have]).strip()


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
