# Sluice.  `make demo` runs the main job, `make test` the whole test suite.  Both set up
# what they need themselves: Debian packages (as root) and a virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := python3-venv nginx-light iptables iproute2 curl wrk procps tshark

.PHONY: all deps venv demo test unit integration bench bench-parser soak clean

all: test

# Debian packages the tests and the demo drive (nginx origin, iptables REDIRECT, curl, wrk,
# tshark to read the pcap exports back).
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: deps venv
	$(PY) -m tests.lab.demo

test: deps venv
	$(PY) -m pytest -q tests

unit: venv
	$(PY) -m pytest -q tests/unit

integration: deps venv
	$(PY) -m pytest -q tests/integration

bench-parser: venv
	$(PY) -m tests.bench.parser

# mitmproxy 11, the benchmark's reference, in its own virtual environment (never in .venv).
MITM_VENV := .venv-mitm
MITMDUMP  := $(MITM_VENV)/bin/mitmdump

$(MITMDUMP):
	$(PYTHON) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install -q 'mitmproxy>=11,<12'

bench: deps venv bench-parser $(MITMDUMP)
	$(PY) -m tests.bench.proxy --mitmdump $(MITMDUMP) $(if $(BENCH_JSON),--json $(BENCH_JSON))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
