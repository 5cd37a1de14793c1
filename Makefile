# The README's two commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install system-deps bench clean

# setup.py builds the Rust data plane into the source tree (the editable install):
# a change to the Rust workspace re-runs the install.
RUST_SOURCES := $(wildcard proxy/dataplane/Cargo.* proxy/dataplane/*/Cargo.toml proxy/dataplane/*/src/*.rs proxy/dataplane/*/src/*/*.rs)
$(STAMP): pyproject.toml setup.py $(RUST_SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/loopwatch demo

# Debian packages the integration tests start on loopback (skipped when already present).
system-deps:
	bash .ci/system-deps

# The compiled data plane's core (proxy/dataplane, issue 16): format, lints,
# unit tests, the shared vectors and the fuzz properties at their default case
# count (proxy/dataplane/README.md has the long fuzz run). Needs cargo.
.PHONY: rust-check
rust-check:
	cd proxy/dataplane && cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test

test: rust-check $(STAMP) system-deps
	$(BIN)/ruff check loopwatch proxy detectors tests dashboards
	mkdir -p build/types/loopwatch && ln -sfn ../../../loopwatch/__init__.py ../../../loopwatch/__main__.py ../../../proxy ../../../detectors ../../../dashboards build/types/loopwatch/ && $(BIN)/mypy -p loopwatch
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Proxy benchmarks: loopwatch (the Rust data plane) vs nginx, HAProxy, direct; the native
# listener alone (no brain) and the tokio floor (proxy/dataplane/floor, built with cargo)
# beside it; multicore and brain rows (docs/performance.md).
# `make bench BENCH_ARGS=--quick` for the short run.
bench: $(STAMP) system-deps
	$(BIN)/python -m tests.benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache proxy/dataplane/*.so
