# Set-up-and-go targets. Each creates or reuses .venv and installs what it needs.
# CPU installs pin torch (TORCH_SPEC); on a GPU machine: make TORCH_SPEC=torch test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.adpa-installed
PROTOC := $(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto

.PHONY: install test test-fast demo proto bench robustness deploy-check clean

install: $(STAMP)

# uv installs in seconds; it does not read pip's configuration, so scripts/pip_to_uv.py hands it the
# same sources (find-links, mirrors, constraints). INSTALLER=pip, or uv failing, installs with pip.
# The venv is made without pip (ensurepip took 3 s of it): uv comes from PATH or from the system's
# pip, and installs pip into the venv with the rest; the pip path runs ensurepip itself.
# Bytecode: the suite imports about 5,500 of the 18,000 installed modules, and compiling all of them
# took 28 s of a 33 s install. Only torch, transformers and Ray are compiled here: every server,
# trainer and Ray process imports them, and a local Ray starts about eight processes at once that
# would each compile the same modules. Their parts that nothing here imports are left out (the model
# families but Llama's and Qwen2's, Ray's libraries for training, tuning and data): 6 s instead of
# 10.5. Python writes the rest's bytecode the first time a process imports a module, so the targets
# below must be allowed to write it: an inherited PYTHONDONTWRITEBYTECODE would make every process
# compile them again.
unexport PYTHONDONTWRITEBYTECODE
COMPILED := torch transformers ray
NOT_COMPILED := transformers/models/(?!auto/|llama/|qwen2/)[^/]+/|ray/(rllib|tune|train|data|air|llm)/
INSTALLER ?= uv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	@if [ "$(INSTALLER)" = uv ] && { command -v uv >/dev/null || test -x $(BIN)/uv \
	    || $(PYTHON) -m pip --python $(BIN)/python install -q uv; }; then \
	  uv=$$(command -v uv || echo $(BIN)/uv); \
	  echo "installing with $$uv"; \
	  $$uv pip install -q --python $(BIN)/python $$($(PYTHON) scripts/pip_to_uv.py) pip "$(TORCH_SPEC)" -e ".[dev]" \
	  || { echo "uv failed: installing with pip" >&2; $(MAKE) --no-print-directory INSTALLER=pip $@; }; \
	else \
	  echo "installing with pip"; \
	  { $(BIN)/python -m pip --version > /dev/null 2>&1 || $(BIN)/python -m ensurepip > /dev/null; } \
	  && $(BIN)/python -m pip install -q "$(TORCH_SPEC)" && $(BIN)/python -m pip install -q -e ".[dev]"; \
	fi
	@# torch ships a few files for newer Pythons that do not compile here: their errors are expected.
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  $(BIN)/python -m compileall -q -j 0 -x '$(NOT_COMPILED)' $(addprefix $$site/,$(COMPILED)) > /dev/null || true
	touch $@

# The whole suite on every core (pytest-xdist, one test file per worker at a time: a file's module
# fixtures, such as test_ray_serve.py's local Ray, are built once), with line and branch coverage of
# the package (servers and workers included) and its 20 slowest tests listed. Files go out in the order
# tests/conftest.py gives them, longest first (by default xdist sends the files with most tests
# first, which left the longest file for last).
# One worker per core: the suite is CPU-bound. Three workers on 2 cores finished a little sooner in
# one run, but the Ray tests' application then took 90 s to start, and in another a replica took
# over a minute: too close to the Ray tests' limits to be dependable.
PYTEST_PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --cov --cov-report=term --durations=20

# The inner loop: everything that starts no server and trains nothing end to end, without coverage.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

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

# The robustness checks of docs/operations.md, briefly (each exits non-zero on a failure; the long runs
# are their defaults: python robustness/fuzz.py, python robustness/soak.py).
robustness: $(STAMP)
	$(BIN)/python robustness/fuzz.py --grpc-cases 300 --http-cases 100
	$(BIN)/python robustness/soak.py --minutes 0.5 --burst-requests 2

# The deployment files offline (no Docker engine needed): hadolint, the Compose schema, and
# tests/test_deploy.py, which runs the CPU stack's commands and health checks as processes.
deploy-check: $(STAMP)
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(BIN)/python -m pytest -q tests/test_deploy.py

clean:
	rm -rf $(VENV) runs build *.egg-info
