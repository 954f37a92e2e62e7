"""`sluice iptables apply|remove|show` for real, inside network namespaces we create.

- No residue: in a namespace of our own (pristine, or holding an operator's rules), for both
  methods and both families, `iptables-save`, `ip6tables-save`, `ip rule`, `ip -6 rule` and
  every route table read the same before apply and after remove (iptables-save's `#` lines
  are left out: they carry the time).  A second apply gives the same state as the first.
  The namespace forwards already, as a gateway does: the sysctls stay on after remove, on
  purpose, and IPv6 forwarding alone adds a route (the subnet-router anycast address).
- `show` prints exactly the commands `apply` then runs, cleanup included.
- Interfaces are detected with netifaces: every one with an address but lo and the default
  route's.
- The shipped iptables/sluice.rules.v4 and .v6 pass `iptables-restore --test`, load, and are
  removed by `sluice iptables remove` without residue.
- Through the lab: the rules `apply` adds really send the client's connections (IPv4 and
  IPv6, redirect and tproxy) to Sluice, and after `remove` the same URLs are routed directly;
  `local: true` intercepts the gateway's own connections except those of `user`.
"""

from __future__ import annotations

import difflib
import os
import sys

import pytest

from tests.lab.netns import REPO_ROOT, Namespace, _run, netns_list

SNAPSHOT = (["iptables-save"], ["ip6tables-save"], ["ip", "rule"], ["ip", "-6", "rule"],
            ["ip", "route", "show", "table", "all"], ["ip", "-6", "route", "show", "table", "all"])

OPERATOR_RULES = [  # what a gateway may hold before Sluice: all of it must survive, unchanged
    ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"],
    ["iptables", "-t", "nat", "-A", "PREROUTING", "-i", "lan0", "-p", "tcp", "--dport", "25",
     "-j", "REDIRECT", "--to-ports", "2525"],
    ["iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "lan0", "-j", "MARK", "--set-mark",
     "0x100/0x100"],
    ["iptables", "-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT"],
    ["ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"],
    ["ip6tables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport", "22", "-j", "RETURN"],
    ["ip", "rule", "add", "fwmark", "0x100/0x100", "lookup", "200"],
    ["ip", "route", "add", "default", "via", "10.8.0.254", "table", "200"],
]

CONFIGS = {
    "redirect": 'listen: [{host: "::", port: 8080, mode: transparent}]\n'
                "intercept:\n  tls_ports: [443]\n  exclude: [10.0.0.0/8, 'fd00:99::/32']\n"
                "  local: true\n  user: nobody\n",
    "tproxy": 'listen: [{host: "::", port: 8081, mode: tproxy}]\n'
              "intercept:\n  method: tproxy\n  tls_ports: [443]\n  exclude: [10.0.0.0/8]\n",
}


@pytest.fixture
def netns(tmp_path):
    """One namespace of ours: lan0 (10.9.0.1/24, fd00:9::1/64) and wan0 (10.8.0.1/24,
    default route), both veth ends created inside it; always deleted."""
    if os.geteuid() != 0:
        pytest.fail("tests/integration must run as root", pytrace=False)
    ns = Namespace("slnf%d" % os.getpid())
    _run(["ip", "netns", "add", ns.name])
    try:
        ip = ns.ip
        ip("link", "set", "lo", "up")
        # No duplicate address detection: link-local addresses (and their routes) exist at
        # once, so route tables do not change under the test's feet.
        ns.sysctl(net__ipv6__conf__all__accept_dad=0, net__ipv6__conf__default__accept_dad=0)
        for dev in ("lan0", "wan0"):
            ip("link", "add", dev, "type", "veth", "peer", "name", dev + "p")
            ip("link", "set", dev, "up")
            ip("link", "set", dev + "p", "up")
        ip("addr", "add", "10.9.0.1/24", "dev", "lan0")
        ip("addr", "add", "fd00:9::1/64", "dev", "lan0", "nodad")
        ip("addr", "add", "10.8.0.1/24", "dev", "wan0")
        ip("route", "add", "default", "via", "10.8.0.254")
        ns.sysctl(net__ipv4__ip_forward=1, net__ipv6__conf__all__forwarding=1)
        ns.tmp = tmp_path
        yield ns
    finally:
        ns.stop_all()
        _run(["ip", "netns", "del", ns.name], check=False)
        assert ns.name not in netns_list()


def sluice_cmd(ns, *args, config=None, check=True):
    """`python -m appliance ARGS [-c CONFIG]` in `ns`: stdout (asserting exit 0 if `check`)."""
    argv = [sys.executable, "-m", "appliance", *args] + (["-c", str(config)] if config else [])
    out = ns.run(argv, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, "%s: exit %d\n%s\n%s" % (args, out.returncode, out.stdout,
                                                             out.stderr)
    return out.stdout


def snapshot(ns):
    state = {}
    for argv in SNAPSHOT:
        text = ns.run(argv, capture_output=True, text=True, check=True).stdout
        state[" ".join(argv)] = "".join(line for line in text.splitlines(True)
                                        if not line.startswith("#"))
    return state


def assert_same(now, before):
    for key in before:
        assert now[key] == before[key], "%s differs:\n%s" % (key, "".join(difflib.unified_diff(
            before[key].splitlines(True), now[key].splitlines(True), "before", "now")))


def commands(output):
    return [line for line in output.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("baseline", ["pristine", "operator-rules"])
def test_apply_is_idempotent_and_remove_leaves_no_residue(netns, method, baseline):
    if baseline == "operator-rules":
        for argv in OPERATOR_RULES:
            netns.run(argv, check=True)
    config = netns.tmp / "sluice.yaml"
    config.write_text(CONFIGS[method])
    before = snapshot(netns)

    sluice_cmd(netns, "iptables", "apply", config=config)
    applied = snapshot(netns)
    chain = "SLUICE-8080" if method == "redirect" else "SLUICE-8081"
    for tool in ("iptables-save", "ip6tables-save"):
        assert "-A PREROUTING -i lan0 -j %s" % chain in applied[tool]
        assert applied[tool] != before[tool]
    if method == "tproxy":
        assert "fwmark 0x5c/0xff lookup 108081" in applied["ip rule"]
        assert "fwmark 0x5c/0xff lookup 108081" in applied["ip -6 rule"]
        assert "local default dev lo table 108081" in applied["ip route show table all"]
    else:
        assert "-A OUTPUT -m owner ! --uid-owner 65534 -j SLUICE-8080" in applied["iptables-save"]

    sluice_cmd(netns, "iptables", "apply", config=config)
    assert snapshot(netns) == applied            # idempotent: it cleaned up first

    sluice_cmd(netns, "iptables", "remove", config=config)
    assert_same(snapshot(netns), before)         # byte for byte, every family and table
    sluice_cmd(netns, "iptables", "remove", config=config)
    assert_same(snapshot(netns), before)


def test_show_prints_exactly_what_apply_runs(netns):
    config = netns.tmp / "sluice.yaml"
    config.write_text(CONFIGS["redirect"])
    sluice_cmd(netns, "iptables", "apply", config=config)
    # An earlier apply is in place: both print its cleanup, then the same rules.
    shown = commands(sluice_cmd(netns, "iptables", "show", config=config))
    ran = commands(sluice_cmd(netns, "iptables", "apply", config=config))
    assert shown == ran
    assert shown[0] == "iptables -w -t nat -D PREROUTING -i lan0 -j SLUICE-8080"
    assert "iptables -w -t nat -A SLUICE-8080 -p tcp -m tcp --dport 443 -j REDIRECT " \
           "--to-ports 8080" in shown
    sluice_cmd(netns, "iptables", "remove", config=config)


def test_sysctls_are_set_and_reported(netns):
    config = netns.tmp / "sluice.yaml"
    config.write_text(CONFIGS["redirect"])
    netns.sysctl(net__ipv4__ip_forward=0, net__ipv4__conf__all__send_redirects=1)
    out = sluice_cmd(netns, "iptables", "apply", config=config)
    assert "# net.ipv4.ip_forward: 0 -> 1" in out
    assert "# net.ipv4.conf.lan0.send_redirects: 1 -> 0" in out
    values = netns.run(["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                        "net.ipv4.conf.all.send_redirects", "net.ipv4.conf.lan0.send_redirects"],
                       capture_output=True, text=True, check=True).stdout.split()
    assert values == ["1", "1", "0", "0"]
    sluice_cmd(netns, "iptables", "remove", config=config)


def test_interfaces_are_detected(netns):
    config = netns.tmp / "sluice.yaml"
    config.write_text(CONFIGS["redirect"])
    shown = sluice_cmd(netns, "iptables", "show", config=config)
    assert "# LAN interfaces lan0 (detected: every interface with an address except lo and " \
           "the default route's wan0)" in shown
    jumps = [line for line in commands(shown) if " PREROUTING " in line]
    assert jumps == ["iptables -w -t nat -A PREROUTING -i lan0 -j SLUICE-8080",
                     "ip6tables -w -t nat -A PREROUTING -i lan0 -j SLUICE-8080"]
    # No default route: wan0 is a LAN side too.  No address at all: nothing to intercept.
    netns.ip("route", "del", "default")
    assert "LAN interfaces lan0 wan0 " in sluice_cmd(netns, "iptables", "show", config=config)
    for dev in ("lan0", "wan0"):
        netns.ip("addr", "flush", "dev", dev)
    out = netns.run([sys.executable, "-m", "appliance", "iptables", "apply", "-c", str(config)],
                    capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no LAN interface found" in out.stderr
    assert "SLUICE" not in snapshot(netns)["iptables-save"]


def test_apply_refuses_a_missing_interface_before_touching_anything(netns):
    config = netns.tmp / "sluice.yaml"
    config.write_text(CONFIGS["redirect"] + "  interfaces: [lan0, eth7]\n")
    before = snapshot(netns)
    out = netns.run([sys.executable, "-m", "appliance", "iptables", "apply", "-c", str(config)],
                    capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no interface eth7" in out.stderr
    assert snapshot(netns) == before


@pytest.mark.parametrize("family", [4, 6])
def test_shipped_rules_files_restore_and_remove_cleanly(netns, family):
    """Loaded by iptables-restore, removed by `sluice iptables remove`: every rule goes.  The
    nat table iptables-restore created stays, empty (only tables apply itself created carry
    the mark that lets remove delete them), so the rules are compared, not iptables-save."""
    tool = "iptables" if family == 4 else "ip6tables"
    path = REPO_ROOT / "iptables" / ("sluice.rules.v%d" % family)

    def rules():
        return netns.run([tool, "-w", "-t", "nat", "-S"], capture_output=True, text=True,
                         check=True).stdout
    before = rules()
    test = netns.run([tool + "-restore", "--test", str(path)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    netns.run([tool + "-restore", "--noflush", str(path)], check=True)
    assert "-A PREROUTING -i eth1 -j SLUICE-8080" in rules()
    sluice_cmd(netns, "iptables", "remove", config=REPO_ROOT / "etc" / "sluice.yaml")
    assert rules() == before


# -- through the lab: real clients, real interception ----------------------------------------

def wait_flows(handle, count, timeout=5.0):
    """The number of flows in Sluice's access log once it reaches `count` (or the timeout)."""
    return len(handle.wait_flows(count=count, timeout=timeout))


LAB_CONFIGS = {
    "redirect": {"listen": [{"host": "::", "port": 8080, "mode": "transparent"}]},
    "tproxy": {"listen": [{"host": "::", "port": 8081, "mode": "tproxy"}]},
}


@pytest.mark.parametrize("method", ["redirect", "tproxy"])
def test_apply_intercepts_both_families_and_remove_stops_it(lab, sluice, static_files, method):
    config = dict(LAB_CONFIGS[method], log_level="info",
                  intercept={"interfaces": [lab.gateway_dev], "method": method})
    handle = sluice(config, dports=())
    page = static_files["/index.html"]
    urls = (lab.url("/index.html"), lab.url("/index.html", ip6=True))
    try:
        sluice_cmd(lab.gateway, "iptables", "apply", config=handle.config_path)
        for url in urls:
            rc, body, err = lab.curl(["-g", url])
            assert (rc, body) == (0, page.path.read_bytes()), err
        assert wait_flows(handle, 2) == 2
        log = handle.log()
        for origin in (lab.origin_ip, lab.origin_ip6):
            assert any(f["dest"] in ("%s:80" % origin, "[%s]:80" % origin) and f["url"].endswith("/index.html")
                       and f["status"] == "200" for f in handle.flows()), log
    finally:
        sluice_cmd(lab.gateway, "iptables", "remove", config=handle.config_path)
    for url in urls:
        rc, body, err = lab.curl(["-g", url])
        assert (rc, body) == (0, page.path.read_bytes()), err  # routed, not intercepted
    assert wait_flows(handle, 3, timeout=0.5) == 2


def test_local_intercepts_the_gateways_own_connections_except_the_users(lab, sluice, static_files):
    """Sluice runs as root here, so `user: root` is what keeps its own connections out;
    a client running as nobody in the gateway namespace is intercepted, root's is not."""
    config = dict(LAB_CONFIGS["redirect"], log_level="info",
                  intercept={"interfaces": [lab.gateway_dev], "local": True, "user": "root"})
    handle = sluice(config, dports=())
    url = lab.url("/index.html")
    curl = ["curl", "-sS", "--noproxy", "*", "--max-time", "10", url]
    try:
        sluice_cmd(lab.gateway, "iptables", "apply", config=handle.config_path)
        as_nobody = lab.gateway.run(["setpriv", "--reuid=65534", "--regid=65534",
                                     "--clear-groups", *curl], capture_output=True, timeout=30)
        assert as_nobody.stdout == static_files["/index.html"].path.read_bytes(), as_nobody.stderr
        assert wait_flows(handle, 1) == 1  # one exchange: Sluice's own was not looped
        assert wait_flows(handle, 2, timeout=0.5) == 1
        as_root = lab.gateway.run(curl, capture_output=True, timeout=30)
        assert as_root.stdout == static_files["/index.html"].path.read_bytes()
        assert wait_flows(handle, 2, timeout=0.5) == 1  # root is the exempt user
    finally:
        sluice_cmd(lab.gateway, "iptables", "remove", config=handle.config_path)
