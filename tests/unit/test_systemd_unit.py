"""systemd/sluice.service: what the issue asks of it, `systemd-analyze verify` silent, and
`systemd-analyze security` scoring it (offline: no running systemd needed).  Verify insists
that every Exec path exists, so it reads a copy whose /usr/local/bin/sluice is this
environment's `sluice` script; nothing else is changed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "sluice.service"
MAX_EXPOSURE = 2.0   # systemd-analyze security: 1.5 at the time of writing ("OK")


def settings(text):
    """[Service] (and the other sections) as NAME -> list of values, in order."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            out.setdefault(name, []).append(value)
    return out


@pytest.fixture
def analyzable(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (make deps)",
                    pytrace=False)
    sluice = Path(sys.executable).with_name("sluice")
    assert sluice.exists(), "the sluice script of this environment (pip install -e .)"
    unit = tmp_path / "sluice.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sluice", str(sluice)))
    return unit


def analyze(*args):
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=60)


def test_the_unit_says_what_the_issue_asks():
    unit = settings(UNIT.read_text())
    config = "-c /etc/sluice/sluice.yaml"
    expected = {
        "Type": ["notify"], "User": ["sluice"], "Restart": ["on-failure"],
        "ExecStartPre": ["/usr/local/bin/sluice check " + config],
        "ExecStart": ["/usr/local/bin/sluice run " + config],
        "ExecStartPost": ["+/usr/local/bin/sluice iptables apply " + config],
        "ExecStopPost": ["+/usr/local/bin/sluice iptables remove " + config],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"], "StateDirectory": ["sluice"],
        "ProtectHome": ["yes"], "PrivateTmp": ["yes"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
    }
    assert {name: unit.get(name) for name in expected} == expected
    assert unit["WatchdogSec"] and unit["NotifyAccess"] == ["main"]
    dropin = settings((ROOT / "systemd" / "tproxy.conf").read_text())
    for name in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert dropin[name] == ["CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_NET_RAW"]


def test_verify_is_silent(analyzable):
    out = analyze("verify", str(analyzable))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_verify_is_silent_with_the_tproxy_dropin(analyzable):
    dropins = analyzable.with_name("sluice.service.d")
    dropins.mkdir()
    shutil.copy(ROOT / "systemd" / "tproxy.conf", dropins)
    out = analyze("verify", str(analyzable))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    security = analyze("security", "--offline=true", str(analyzable))
    assert "✗ CapabilityBoundingSet=~CAP_NET_ADMIN" in security.stdout  # the drop-in applies


def test_security_exposure(analyzable):
    out = analyze("security", "--offline=true", str(analyzable))
    score = re.search(r"Overall exposure level for sluice\.service: ([0-9.]+) (\w+)", out.stdout)
    assert score, out.stdout + out.stderr
    assert float(score.group(1)) <= MAX_EXPOSURE, out.stdout
