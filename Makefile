# Sluice.  `make demo` runs the main job, `make test` the whole test suite.  Both set up
# what they need themselves: Debian packages (as root) and a virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := python3-venv nginx-light iptables iproute2 curl wrk procps nftables ruby systemd strace tshark openssl \
          chromium tmux

.PHONY: all deps venv demo test unit integration bench bench-quick bench-deps bench-parser soak clean \
        install uninstall runtime-deps iptables-rules

all: test

# Debian packages the tests and the demo drive (nginx origin, iptables and nft, curl, wrk; ruby
# parses the Vagrantfile, systemd-analyze checks the unit, strace its system calls, tshark reads
# the pcap exports back; headless chromium renders the admin endpoint's live page, tmux gives
# `sluice top` a terminal).
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

# The proxies `make bench` compares Sluice with (not needed by `make test`).  On a machine that
# runs systemd, installing them also starts their stock services (ports 3128 and none for
# haproxy's empty default config); the bench runs its own copies inside the lab namespaces.
BENCH_DEBS := haproxy squid

bench-deps:
	@$(MAKE) --no-print-directory deps DEBS="$(BENCH_DEBS)"

# `make bench`: the parser bench (a missed target there does not stop the rest), then the proxy
# bench, full size (1 GiB bodies, 3 repetitions; about 25 minutes on 2 cores), written to
# bench/results.md (BENCH_ARGS="--wait-quiet 300" waits for other labs to end first).
# `make bench-quick`: the same code, small sizes, one repetition (~2 min).
bench: deps bench-deps venv $(MITMDUMP)
	-$(PY) -m tests.bench.parser
	$(PY) -m tests.bench.proxy --mitmdump $(MITMDUMP) --results bench/results.md $(if $(BENCH_JSON),--json $(BENCH_JSON)) $(BENCH_ARGS)

bench-quick: deps bench-deps venv $(MITMDUMP)
	$(PY) -m tests.bench.proxy --quick --mitmdump $(MITMDUMP) --results bench/results-quick.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# iptables/sluice.rules.v4 and .v6: etc/sluice.yaml rendered for a LAN interface named eth1
# (a gateway's interfaces cannot be detected deterministically); tests keep them current.
iptables-rules: venv
	for f in 4 6; do $(PY) -m appliance iptables show -c etc/sluice.yaml \
	  --set 'intercept.interfaces=[eth1]' --format rules.v$$f > iptables/sluice.rules.v$$f; done

# --- install on a gateway (Debian 12, as root) ------------------------------------------------
# `make install` puts the package in its own virtual environment in /opt/sluice, the command in
# /usr/local/bin, the config in /etc/sluice (an edited sluice.yaml is never overwritten: the new
# default goes beside it as sluice.yaml.new), the unit in /usr/local/lib/systemd/system, the
# state directory /var/lib/sluice, and creates the `sluice` system user.  DESTDIR=/some/root
# stages the same tree there (the user is then not created: the target's install does that).
# `make uninstall` removes what install added; an edited config and a non-empty state
# directory stay.
DESTDIR       ?=
SYSTEM_PYTHON ?= /usr/bin/python3
OPT       := /opt/sluice
SHARE     := $(OPT)/share/sluice
BINDIR    := /usr/local/bin
UNITDIR   := /usr/local/lib/systemd/system
CONFDIR   := /etc/sluice
STATEDIR  := /var/lib/sluice
SLUICE_USER := sluice
RUNTIME_DEBS := python3-venv iptables iproute2 procps nftables

runtime-deps:
	@$(MAKE) --no-print-directory deps DEBS="$(RUNTIME_DEBS)"

install:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make install: run it as root (or stage it with DESTDIR=DIR)"; exit 2; fi
	@if [ -z "$(DESTDIR)" ]; then $(MAKE) --no-print-directory runtime-deps; fi
	$(SYSTEM_PYTHON) -m venv $(DESTDIR)$(OPT)
	$(DESTDIR)$(OPT)/bin/python -m pip install -q --use-pep517 $(if $(DESTDIR),--no-compile) .
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -e '$(DESTDIR)$(OPT)' $(DESTDIR)$(OPT)/bin $(DESTDIR)$(OPT)/pyvenv.cfg \
	    | xargs -r sed -i 's#$(DESTDIR)$(OPT)#$(OPT)#g'; \
	  $(DESTDIR)$(OPT)/bin/python -m compileall -q -f -s $(DESTDIR) -p / $(DESTDIR)$(OPT)/lib >/dev/null; \
	fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)/rules.d \
	  $(DESTDIR)$(SHARE)/iptables $(DESTDIR)$(SHARE)/systemd $(DESTDIR)$(OPT)/share/doc/sluice
	install -d -m 0750 $(DESTDIR)$(STATEDIR)
	ln -sfn $(OPT)/bin/sluice $(DESTDIR)$(BINDIR)/sluice
	@conf=$(DESTDIR)$(CONFDIR)/sluice.yaml; \
	if [ ! -e $$conf ] || cmp -s $$conf $(DESTDIR)$(SHARE)/sluice.yaml.installed; then \
	  install -m 0644 etc/sluice.yaml $$conf; echo "installed $(CONFDIR)/sluice.yaml"; \
	elif ! cmp -s $$conf etc/sluice.yaml; then \
	  install -m 0644 etc/sluice.yaml $$conf.new; \
	  echo "kept your edited $(CONFDIR)/sluice.yaml; the new default is $(CONFDIR)/sluice.yaml.new"; \
	fi
	install -m 0644 etc/sluice.yaml $(DESTDIR)$(SHARE)/sluice.yaml.installed
	install -m 0644 iptables/sluice.rules.v4 iptables/sluice.rules.v6 $(DESTDIR)$(SHARE)/iptables/
	install -m 0644 systemd/tproxy.conf $(DESTDIR)$(SHARE)/systemd/
	install -m 0644 README.md $(DESTDIR)$(OPT)/share/doc/sluice/
	install -m 0644 systemd/sluice.service $(DESTDIR)$(UNITDIR)/sluice.service
	@if [ -n "$(DESTDIR)" ]; then \
	  echo "DESTDIR is set: the $(SLUICE_USER) user was not created (on the target: useradd --system --user-group --home-dir $(STATEDIR) --shell /usr/sbin/nologin $(SLUICE_USER))"; \
	else \
	  if ! getent passwd $(SLUICE_USER) >/dev/null; then \
	    useradd --system --user-group --home-dir $(STATEDIR) --no-create-home \
	      --shell /usr/sbin/nologin $(SLUICE_USER) && touch $(SHARE)/user-created \
	      && echo "created the system user $(SLUICE_USER)"; \
	  fi; \
	  chown $(SLUICE_USER):$(SLUICE_USER) $(STATEDIR); \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	  echo "next: edit $(CONFDIR)/sluice.yaml, review with 'sluice iptables show -c $(CONFDIR)/sluice.yaml', then 'systemctl enable --now sluice'"; \
	fi

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "make uninstall: run it as root (or with DESTDIR=DIR)"; exit 2; fi
	@if [ -z "$(DESTDIR)" ]; then \
	  if [ -d /run/systemd/system ]; then systemctl disable --now sluice 2>/dev/null || true; fi; \
	  if [ -x $(OPT)/bin/sluice ] && [ -e $(CONFDIR)/sluice.yaml ]; then \
	    $(OPT)/bin/sluice iptables remove -c $(CONFDIR)/sluice.yaml >/dev/null 2>&1 || true; fi; \
	fi
	rm -f $(DESTDIR)$(UNITDIR)/sluice.service $(DESTDIR)$(BINDIR)/sluice
	@conf=$(DESTDIR)$(CONFDIR)/sluice.yaml; shipped=$(DESTDIR)$(SHARE)/sluice.yaml.installed; \
	if [ -e $$conf.new ] && cmp -s $$conf.new $$shipped; then rm -f $$conf.new; fi; \
	if [ -e $$conf ] && cmp -s $$conf $$shipped; then rm -f $$conf; \
	elif [ -e $$conf ]; then echo "kept your edited $(CONFDIR)/sluice.yaml"; fi
	@rmdir $(DESTDIR)$(CONFDIR)/rules.d 2>/dev/null || echo "kept $(CONFDIR)/rules.d: it is not empty"
	@rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true
	@rmdir $(DESTDIR)$(STATEDIR) 2>/dev/null || echo "kept $(STATEDIR): it is not empty"
	@if [ -z "$(DESTDIR)" ] && [ -e $(SHARE)/user-created ]; then \
	  userdel $(SLUICE_USER) && echo "removed the system user $(SLUICE_USER)"; fi
	rm -rf $(DESTDIR)$(OPT)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
