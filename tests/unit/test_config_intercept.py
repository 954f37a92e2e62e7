"""The intercept section: every key validated with FILE:LINE, and every combination that
cannot work refused, so that `sluice check` (the unit's ExecStartPre) stops it."""

import subprocess
import sys

import pytest

from appliance import config
from appliance.errors import ConfigError

LISTEN = 'listen:\n  - {host: "::", port: 8080, mode: transparent}\n'


def test_absent_means_none_and_empty_means_defaults():
    assert config.load(text=LISTEN).intercept is None
    assert config.load(text=LISTEN + "intercept:\n").intercept is None
    icpt = config.load(text=LISTEN + "intercept: {}\n").intercept
    assert (icpt.interfaces, icpt.ports, icpt.tls_ports, icpt.exclude, icpt.method, icpt.ipv6,
            icpt.local, icpt.user) == (None, (80,), (), (), "redirect", True, False, "sluice")


def test_values_are_normalized():
    icpt = config.load(text=LISTEN + "intercept:\n  interfaces: [eth1, eth0.100, 'wl+']\n"
                       "  exclude: [10.0.0.0/8, 'FD00:0::/8']\n").intercept
    assert icpt.interfaces == ("eth1", "eth0.100", "wl+")
    assert icpt.exclude == ("10.0.0.0/8", "fd00::/8")


def test_set_reaches_the_section():
    cfg = config.load(text=LISTEN, overrides=["intercept.ports=[8000]"])
    assert cfg.intercept.ports == (8000,) and cfg.intercept.method == "redirect"


ERRORS = [
    pytest.param(LISTEN + "intercept:\n  ports: [80, 80]\n", 4, "intercept.ports", "twice",
                 id="duplicate-port"),
    pytest.param(LISTEN + "intercept:\n  ports: [0]\n", 4, "intercept.ports", "out of range",
                 id="port-zero"),
    pytest.param(LISTEN + "intercept:\n  interfaces: []\n", 4, "intercept.interfaces",
                 "non-empty", id="no-interfaces"),
    pytest.param(LISTEN + "intercept:\n  interfaces: [lo]\n", 4, "intercept.interfaces",
                 "never a LAN", id="loopback"),
    pytest.param(LISTEN + "intercept:\n  interfaces: [eth1, 'a/b']\n", 4,
                 "intercept.interfaces", "not an interface", id="bad-interface-name"),
    pytest.param(LISTEN + "intercept:\n  interfaces: [averyveryverylongname]\n", 4,
                 "intercept.interfaces", "not an interface", id="interface-too-long"),
    pytest.param(LISTEN + "intercept:\n  exclude: [10.0.0.1/8]\n", 4, "intercept.exclude",
                 "host bits", id="cidr-host-bits"),
    pytest.param(LISTEN + "intercept:\n  exclude: [lan]\n", 4, "intercept.exclude",
                 "not a CIDR", id="not-a-cidr"),
    pytest.param(LISTEN + "intercept:\n  method: nat\n", 4, "intercept.method", "redirect",
                 id="bad-method"),
    pytest.param(LISTEN + "intercept:\n  user: 'root; rm'\n", 4, "intercept.user", "user",
                 id="bad-user"),
    pytest.param(LISTEN + "intercept:\n  bogus: 1\n", 4, "intercept.bogus", "unknown option",
                 id="unknown-key"),
    # combinations that cannot work
    pytest.param(LISTEN + "intercept:\n  method: tproxy\n", 4, "intercept.method",
                 "mode tproxy", id="tproxy-without-tproxy-listener"),
    pytest.param('listen: [{host: "::", port: 8081, mode: tproxy}]\nintercept: {}\n', 2,
                 "intercept.method", "mode transparent", id="redirect-without-transparent"),
    pytest.param('listen: [{host: 127.0.0.1, port: 8080, mode: transparent}]\nintercept: {}\n',
                 2, "intercept.method", "must listen on", id="loopback-listener"),
    pytest.param('listen: [{host: 0.0.0.0, port: 8080, mode: transparent}]\nintercept: {}\n',
                 2, "intercept.ipv6", "IPv4 only", id="ipv6-to-an-ipv4-listener"),
    pytest.param(LISTEN + "intercept:\n  ports: []\n", 4, "intercept.ports", "no port",
                 id="no-port-at-all"),
    pytest.param(LISTEN + "intercept:\n  tls_ports: [443, 80]\n", 4, "intercept.tls_ports",
                 "[80]", id="port-in-both-lists"),
    pytest.param(LISTEN + "intercept:\n  ipv6: false\n  exclude: ['fd00::/8']\n", 5,
                 "intercept.exclude", "exclude nothing", id="ipv6-exclude-without-ipv6"),
    pytest.param('listen: [{host: "::", port: 8081, mode: tproxy}]\n'
                 "intercept:\n  method: tproxy\n  local: true\n", 4, "intercept.local",
                 "redirect only", id="local-with-tproxy"),
]


@pytest.mark.parametrize("text,line,key,words", ERRORS)
def test_refused_with_file_line_and_key(text, line, key, words):
    with pytest.raises(ConfigError) as info:
        config.load("sluice.yaml", text=text)
    problem = info.value.problems[0]
    assert problem.startswith("sluice.yaml:%d: %s: " % (line, key)), problem
    assert words in problem, problem


def test_check_refuses_and_iptables_needs_the_section(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(LISTEN + "intercept:\n  method: tproxy\n")
    out = subprocess.run([sys.executable, "-m", "appliance", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "intercept.method: method tproxy needs" in out.stderr
    path.write_text(LISTEN)
    out = subprocess.run([sys.executable, "-m", "appliance", "iptables", "show", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no intercept section" in out.stderr
