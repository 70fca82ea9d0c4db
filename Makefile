# `make demo`: set up, train the Shakespeare demo on CPU, then sample from it.
# `make test`: set up, run the whole test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python train.py --config configs/shakespeare.yaml
	$(BIN)/python sample.py --model runs/shakespeare --prompt "ROMEO:" --prompt "To be, or not" --max-new-tokens 100 --temperature 0.8 --seed 0

test: setup
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n 2 --durations=15

clean:
	rm -rf $(VENV) runs
