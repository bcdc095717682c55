# Two commands matter: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WEIGHTS := .cache/digits-cnn.safetensors
PROTOS := $(wildcard proto/splitnet/v1/*.proto)

.PHONY: install test lint demo proto bench-codecs lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt setuptools
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation \
		-c constraints.txt -e '.[dev,vision]'
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

$(WEIGHTS): $(STAMP)
	$(VENV)/bin/splitnet train digits-cnn --out $(WEIGHTS)

demo: $(WEIGHTS)
	$(VENV)/bin/splitnet cuts digits-cnn --weights $(WEIGHTS)
	$(VENV)/bin/splitnet eval digits-cnn --weights $(WEIGHTS) \
		--codecs raw,zstd:1,fp16,bf16,int8,int8c,int8+zstd:1

bench-codecs: $(STAMP)
	$(PY) -m benchmarks.codecs

# Re-pin the development set after changing dependencies.
lock: $(STAMP)
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis
