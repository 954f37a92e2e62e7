"""deploy/gateway.sh in the lab's gateway namespace: the script that provisions the Vagrant
gateway VM, run here with SLUICE_INSTALL=0 and SLUICE_SYSTEMD=0 (nothing is installed into
this machine's /, and a namespace has no systemd of its own), the repository's `sluice`
command and the caller's configuration, so that `sluice iptables apply` does the interception.
Used by `make demo` (tests.lab.demo) and tests/integration/test_provision.py.

This module owns nothing but the script runs it starts; the rules they add live in the
gateway namespace and go with it (or with `intercept_off`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .netns import REPO_ROOT, Lab, child_env

SCRIPT = REPO_ROOT / "deploy" / "gateway.sh"
SLUICE = "%s -m appliance" % sys.executable


def provision_gateway(lab: Lab, config: Path, lan: str | None = None,
                      timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run deploy/gateway.sh in the gateway namespace for `config`, the LAN side being `lan`
    (default: the gateway's client-side veth).  Its exit status and output are the caller's
    to check."""
    env = child_env({"SLUICE_INSTALL": "0", "SLUICE_SYSTEMD": "0", "SLUICE": SLUICE,
                     "SLUICE_CONFIG": str(config), "SLUICE_LAN": lan or lab.gateway_dev})
    return lab.gateway.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True,
                           timeout=timeout)


def intercept_off(lab: Lab, config: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`sluice iptables remove -c CONFIG` in the gateway namespace."""
    return lab.gateway.run([sys.executable, "-m", "appliance", "iptables", "remove", "-c",
                            str(config)], capture_output=True, text=True, timeout=timeout)
