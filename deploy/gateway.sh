#!/bin/sh
# Provision a Sluice gateway: install Sluice, name the LAN side in its config, check it, and
# intercept: under systemd by enabling the unit (which applies the rules once Sluice is
# READY), without systemd by running `sluice iptables apply` itself.
#
# One script, two users:
#   - the Vagrantfile's gateway VM (Debian 12, as root, systemd): everything, with defaults;
#   - `make demo` and tests/integration/test_provision.py, inside the lab's gateway network
#     namespace: SLUICE_INSTALL=0 SLUICE_SYSTEMD=0, with the repository's command and a
#     config of their own; they run Sluice themselves.
#
# Environment (all optional):
#   SLUICE_SRC       the source tree to install (default: the directory above this script)
#   SLUICE_CONFIG    the configuration (default /etc/sluice/sluice.yaml; created from the
#                    shipped default if missing)
#   SLUICE_LAN       the LAN interface(s), separated by spaces; written into the config in
#                    place of `interfaces: null` (default: leave it, Sluice detects them)
#   SLUICE_LAN_ADDR  or: an address of the LAN interface, which is looked up
#   SLUICE_INSTALL   1 (default): `make install`; 0: use $SLUICE as it is
#   SLUICE           the sluice command (default /usr/local/bin/sluice)
#   SLUICE_SYSTEMD   1: enable and (re)start sluice.service; 0: check and apply only
#                    (default: 1 if systemd runs this box)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
SLUICE_SRC=${SLUICE_SRC:-$(dirname "$here")}
SLUICE_CONFIG=${SLUICE_CONFIG:-/etc/sluice/sluice.yaml}
SLUICE_INSTALL=${SLUICE_INSTALL:-1}
SLUICE=${SLUICE:-/usr/local/bin/sluice}
if [ -z "${SLUICE_SYSTEMD:-}" ]; then
  if [ -d /run/systemd/system ]; then SLUICE_SYSTEMD=1; else SLUICE_SYSTEMD=0; fi
fi

say() { echo "gateway.sh: $*"; }

if [ "$SLUICE_INSTALL" = 1 ]; then
  if ! command -v make >/dev/null; then
    say "installing make"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make >/dev/null
  fi
  say "make install from $SLUICE_SRC"
  make -C "$SLUICE_SRC" --no-print-directory install
fi

if [ ! -e "$SLUICE_CONFIG" ]; then
  say "no $SLUICE_CONFIG: starting from the shipped default"
  install -D -m 0644 "$SLUICE_SRC/etc/sluice.yaml" "$SLUICE_CONFIG"
fi

if [ -z "${SLUICE_LAN:-}" ] && [ -n "${SLUICE_LAN_ADDR:-}" ]; then
  SLUICE_LAN=$(ip -o addr show | awk -v addr="$SLUICE_LAN_ADDR" \
    'index($4, addr "/") == 1 { print $2; exit }')
  [ -n "$SLUICE_LAN" ] || { say "no interface holds $SLUICE_LAN_ADDR"; exit 1; }
fi
if [ -n "${SLUICE_LAN:-}" ]; then
  list=$(echo $SLUICE_LAN | sed 's/ /, /g')
  if grep -q '^  interfaces: null$' "$SLUICE_CONFIG"; then
    sed -i "s/^  interfaces: null\$/  interfaces: [$list]/" "$SLUICE_CONFIG"
    say "LAN interfaces [$list] written into $SLUICE_CONFIG"
  else
    say "$SLUICE_CONFIG names its interfaces already (no 'interfaces: null'): left as it is"
  fi
fi

$SLUICE check -c "$SLUICE_CONFIG"

if [ "$SLUICE_SYSTEMD" = 1 ]; then
  systemctl daemon-reload
  systemctl enable sluice
  systemctl restart sluice     # ExecStartPre checks, ExecStartPost applies the rules
  systemctl --no-pager --lines=0 status sluice
else
  say "no systemd here: applying the rules; the caller runs \`sluice run -c $SLUICE_CONFIG\`"
  $SLUICE iptables apply -c "$SLUICE_CONFIG"
fi
