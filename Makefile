# Two commands for a newcomer: `make demo` and `make test`. Each bootstraps .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-install only when the project's requirements change; pip is idempotent either way.
# Keep pip's byte-compiling (no --no-compile): it saves ~33 s of install, but where PYTHONDONTWRITEBYTECODE
# is set (these machines) nothing else ever caches bytecode, so every process - each Ray worker - compiles
# torch and ray again on import: make test went from ~9 to 15 minutes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/sweep.py --config jobs/configs/demo.yaml --storage-path $(DEMO_DIR)

# Two test processes (pytest-xdist), each with its own local Ray of 2 CPUs: one process alone leaves the
# 2 cores half idle while Ray starts workers and Train polls them. A module stays in one process
# (--dist loadfile), so its module-scoped fixtures (a trained surrogate, a store) are built once; the
# heaviest modules go first (tests/conftest.py), not the ones with most tests (xdist's default).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) out
