# Set-up-and-go targets. Each creates or reuses .venv and installs what it needs.
# CPU installs pin torch (TORCH_SPEC); on a GPU machine: make TORCH_SPEC=torch test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.adpa-installed
PROTOC := $(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto

.PHONY: install test demo proto bench deploy-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The whole suite, with its 20 slowest tests listed; `pytest -m "not slow"` is the quick inner loop.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

demo: $(STAMP)
	$(BIN)/adpa demo

# Regenerate the gRPC stubs in proto/adpa/v1 from the .proto files (tests check they are current).
proto: $(STAMP)
	$(PROTOC) proto/adpa/v1/*.proto

# The CPU benchmarks of docs/benchmarks.md (each prints JSON and a table; `adpa bench --help` lists all).
bench: $(STAMP)
	$(BIN)/adpa bench serving
	$(BIN)/adpa bench fidelity
	$(BIN)/adpa bench step_overhead
	$(BIN)/adpa bench concurrency
	$(BIN)/adpa bench prefix_sharing
	$(BIN)/adpa bench memory

# The deployment files offline (no Docker engine needed): hadolint, the Compose schema, and
# tests/test_deploy.py, which runs the CPU stack's commands and health checks as processes.
deploy-check: $(STAMP)
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/python -m pytest -q tests/test_deploy.py

clean:
	rm -rf $(VENV) runs build *.egg-info
