# fsbuild — the two quick-start commands are `make demo` and `make test`; both run `make deps`.
TARGET ?= linux-6.1
CONFIG ?= mini
RPM_ARGS ?=
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: deps lint test quick soak bench fuzz demo stress stress-ci static userspace clean

deps:
	bash ci/deps.sh

# ruff (rules in pyproject.toml) and mypy --strict on fsbuild/: zero findings
lint: deps
	$(PYTHON) -m ruff check fsbuild tests ci
	$(PYTHON) -m mypy

test: deps lint
	$(PYTHON) -m pytest -m "not soak" $(PYTEST_ARGS)

# Local edit loop: no kernel builds or boots (CI runs `make test`, i.e. everything).
quick: deps lint
	$(PYTHON) -m pytest -m "not slow and not soak" $(PYTEST_ARGS)

# Many-trial proofs (e.g. 50 random SIGKILL/SIGTERM trials of apply + recovery).
soak: deps
	$(PYTHON) -m pytest -m soak $(PYTEST_ARGS)

bench: deps
	$(PYTHON) ci/bench.py

# The patch parser against a million mutated real diffs (make test runs 20,000 of them).
FUZZ_COUNT ?= 1000000
fuzz:
	nice $(PYTHON) tests/test_fuzz.py $(FUZZ_COUNT)

# End to end: RPMs for $(TARGET) with rpmbuild, verified, installed into an empty root,
# then smoke-booted in QEMU. el6: make demo TARGET=el6 FSBUILD_EL6_SRC=/path/to/src
# (RPM_ARGS: more `fsbuild rpm` options, e.g. CONFIG=full RPM_ARGS=--allow-missing-firmware)
demo: deps
	FSBUILD_RPM_ARGS="$(RPM_ARGS)" bash ci/e2e.sh $(TARGET) $(CONFIG)

# Debug kernel (KASAN, lockdep, ...) for $(TARGET) + the guest stress suite; verdict and RPMs
# in out/$(TARGET)/debug/ (never the production ones). Then the static checks.
stress: deps
	$(PYTHON) -m fsbuild rpm -t $(TARGET) --config debug
	$(PYTHON) -m fsbuild smoke -t $(TARGET) --config debug --suite stress
	$(MAKE) static

# CI's share of the above: the stress suite on the mini RPMs already in out/$(TARGET)/rpms (no
# debug build); verdict in out/$(TARGET)/stress/, out/$(TARGET)/smoke.json stays the demo's.
stress-ci: deps
	$(PYTHON) -m fsbuild smoke -t $(TARGET) --suite stress

# checkpatch + sparse on module/ and the patches (tests/test_static.py, ci/static-allowlist.txt)
static:
	$(PYTHON) -m pytest tests/test_static.py $(PYTEST_ARGS)

userspace:
	$(MAKE) -C library
	$(MAKE) -C demo

clean:
	rm -rf out .fsbuild
	-$(MAKE) -C library clean
	-$(MAKE) -C demo clean
