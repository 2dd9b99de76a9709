# One command to set up and serve, one to test. Everything lives in .venv.
PYTHON ?= python3
VENV ?= .venv
# CPU machines: the CPU build. GPU machines: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: install serve test demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/adasd serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/adasd build-demo

bench: install
	$(BIN)/adasd bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
