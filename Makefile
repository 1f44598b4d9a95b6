# make demo   - set up, then crash real programs in containers and show where the cores went
# make test   - set up, then lint, check the import layering and run the whole test suite
# make quick  - the quick loop: no root, nothing crashes, no server process, browser or kubectl
#               (pytest -m "not crash and not servers")
# make bench  - capture, analysis and vault benchmarks (against baselines measured in the same run)
# make image  - build the container image with podman, offline from any registry, and corevault.oci.tar

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := runc busybox-static gdb elfutils zstd bubblewrap gcc g++ libc6-dev binutils libc6-dbg postgresql chromium curl \
	golang-go rustc debuginfod s3fs rclone fuse3 podman slirp4netns buildah mmdebstrap umoci skopeo containerd \
	prometheus prometheus-alertmanager tinyproxy-bin erofs-utils

.PHONY: setup apt venv npm demo test quick lint bench image clean

setup: apt venv npm

# Azurite, the Azure Blob Storage emulator the tests start (from the npm registry, telemetry off)
AZURITE_VERSION := 3.35.0
npm: build/npm/.azurite-$(AZURITE_VERSION)

build/npm/.azurite-$(AZURITE_VERSION):
	mkdir -p build/npm
	npm install --prefix build/npm --no-audit --no-fund --silent azurite@$(AZURITE_VERSION)
	@touch $@

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "corevault needs Python 3.11 or newer"'
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# the sandboxed analysis worker reads the package read-only and writes no bytecode: compile it
	@# here as a wheel's install does, or every worker compiles corevault's modules again
	$(PY) -m compileall -q src
	@touch $@

lint: venv
	$(VENV)/bin/ruff check src tests testbed bench
	$(VENV)/bin/ruff format --check src tests testbed bench
	$(VENV)/bin/lint-imports --no-cache

test: setup lint
	$(PY) -m pytest -q

quick: venv
	$(PY) -m pytest -q -m "not crash and not servers"

demo: setup
	$(PY) -m testbed.demo

bench: setup
	@# the analysis worker reads the package read-only: give it the bytecode an installed package has
	$(PY) -m compileall -q src
	$(PY) -m bench.capture
	$(PY) -m bench.analysis
	$(PY) -m bench.analysis_cost
	$(PY) -m bench.vault
	$(PY) -m bench.server
	$(PY) -m bench.search
	$(PY) -m bench.fleet
	$(PY) -m bench.socketmode
	$(PY) -m bench.storm --pods 200 --crashes 3 --modes pipe,socket --baseline 30
	$(PY) -m bench.snapshot
	$(PY) -m bench.stores
	$(PY) -m bench.s3requests
	$(PY) -m bench.fuse
	$(PY) -m bench.tenants
	$(PY) -m bench.spool_shares
	$(PY) -m bench.procevents

image: setup
	$(PY) -m testbed.image

clean:
	rm -rf $(VENV) .pytest_cache build corevault.oci.tar
