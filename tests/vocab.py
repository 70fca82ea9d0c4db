"""llama.cpp's tokenizer test vectors: `ggml-vocab-NAME.gguf` vocabularies (no weights)
with inputs (`.gguf.inp`) and the ids llama.cpp produces for them (`.gguf.out`).

They ship in the llama-cpp-python sdist (its vendored llama.cpp/models), which
`make setup` downloads, unextracted, into the test cache beside the virtual
environment (`$JAXAR_TEST_CACHE`, default `<sys.prefix>/jaxar-test-cache`).
The files a test asks for are extracted from it on first use, under a file
lock, into the same cache; never into the repository.
"""

from __future__ import annotations

import os
import tarfile

from tests.smollm2 import cache_dir

SDIST = "llama_cpp_python-0.3.36.tar.gz"
MEMBER_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
MARKER = "\n__ggml_vocab_test__\n"
INSTALL_HINT = ("run `make setup` (it runs `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 "
                "-d $(VENV)/jaxar-test-cache`)")


def vocab_path(name: str) -> str:
    """Path of `ggml-vocab-{name}.gguf`, its `.inp` and `.out` beside it, extracted on first use."""
    import filelock

    cache = cache_dir()
    out_dir = os.path.join(cache, "llama-cpp-vocab")
    files = [f"ggml-vocab-{name}.gguf" + ext for ext in ("", ".inp", ".out")]
    path = os.path.join(out_dir, files[0])
    os.makedirs(out_dir, exist_ok=True)
    with filelock.FileLock(os.path.join(cache, "llama-cpp-vocab.lock")):
        if all(os.path.isfile(os.path.join(out_dir, f)) for f in files):
            return path
        sdist = os.path.join(cache, SDIST)
        if not os.path.isfile(sdist):
            raise RuntimeError(f"{sdist} is missing: {INSTALL_HINT}")
        with tarfile.open(sdist, "r:gz") as tar:
            for f in files:
                src = tar.extractfile(f"{MEMBER_DIR}/{f}")
                tmp = os.path.join(out_dir, f + ".tmp")
                with open(tmp, "wb") as dst:
                    dst.write(src.read())
                os.replace(tmp, os.path.join(out_dir, f))
    return path


def vectors(name: str) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids without BOS) pairs of the vocabulary's test file."""
    path = vocab_path(name)
    with open(path + ".inp", encoding="utf-8") as f:
        texts = f.read().split(MARKER)[:-1]
    with open(path + ".out", encoding="utf-8") as f:
        outs = f.read().split("\n")[:-1]
    assert len(texts) == len(outs), (path, len(texts), len(outs))
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]
