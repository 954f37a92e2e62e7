"""appliance.netfilter as data: the rules rendered for a configuration are compared with the
argv lists in tests/data/netfilter/, every -A is mirrored by a -D, the cleanup is computed
from real `iptables -S` / `ip rule` listings, and the shipped iptables/sluice.rules.v4 and .v6
stay what `sluice iptables show` renders.  No root, no network: nothing here runs a tool."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config, netfilter

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "netfilter"
# The shipped rules files are etc/sluice.yaml rendered for a LAN interface named eth1: a
# gateway's interfaces cannot be detected deterministically, so the files name one.
RULES_FILES_ARGS = ["-c", str(ROOT / "etc" / "sluice.yaml"), "--set", "intercept.interfaces=[eth1]"]

TRANSPARENT = 'listen: [{host: "::", port: 8080, mode: transparent}]\n'
TPROXY = 'listen: [{host: "::", port: 8081, mode: tproxy}, {host: "::", port: 8080, mode: transparent}]\n'

# case id -> (configuration text, LAN interfaces)
CASES = {
    "redirect-default": (TRANSPARENT + "intercept: {}\n", ("eth1",)),
    "redirect-v4-local-exclude-tls": (
        'listen: [{host: "0.0.0.0", port: 3128, mode: transparent}]\n'
        "intercept:\n  ports: [80, 8000]\n  tls_ports: [443]\n  exclude: [10.0.0.0/8, 192.168.7.0/24]\n"
        "  ipv6: false\n  local: true\n  user: proxy\n", ("eth1", "wlan0")),
    "tproxy-both-families": (
        TPROXY + "intercept:\n  method: tproxy\n  tls_ports: [443]\n"
        '  exclude: ["fd00:1::/48", 203.0.113.0/24]\n', ("br-lan",)),
    "interface-names": (TRANSPARENT + "intercept: {ipv6: false}\n", ("eth0.100", "vlan+", "lan1")),
}


def rendered(case):
    text, interfaces = CASES[case]
    return netfilter.render(config.load("%s.yaml" % case, text=text), interfaces)


def as_lines(argvs):
    return "".join(shlex.join(argv) + "\n" for argv in argvs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_install_matches_the_expected_file(case):
    expected = (DATA / ("%s.install" % case)).read_text()
    assert as_lines(rendered(case).install()) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_uninstall_mirrors_install(case):
    """install() read backwards, each -A as -D, each -N as -X, each ip ... add as del (the
    sysctls stay: a gateway forwards with or without Sluice)."""
    ruleset = rendered(case)
    install = [argv for argv in ruleset.install() if argv[0] != "sysctl"]
    undo = {"-A": "-D", "-N": "-X", "add": "del"}
    assert ruleset.uninstall() == [[undo.get(w, w) for w in argv] for argv in reversed(install)]
    assert len([a for a in install if "-A" in a]) == len(ruleset.rules)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chain_starts_with_local_and_excluded_returns(case):
    ruleset = rendered(case)
    for family in ruleset.families:
        body = [r.spec for r in ruleset.rules if r.chain == ruleset.chain and r.family == family]
        targets = [spec[spec.index("-j") + 1] for spec in body]
        assert body[0] == ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN")
        returns = targets.count("RETURN")
        assert targets[:returns] == ["RETURN"] * returns and "RETURN" not in targets[returns:]
        assert len(targets) - returns == len(ruleset.ports)


def test_tls_ports_go_to_the_same_listener():
    ruleset = rendered("redirect-v4-local-exclude-tls")
    redirected = [r.spec for r in ruleset.rules if "REDIRECT" in r.spec]
    assert [s[s.index("--dport") + 1] for s in redirected] == ["80", "443", "8000"]
    assert {s[-1] for s in redirected} == {"3128"}


def test_local_exempts_the_user_and_adds_no_jump_without_it():
    local = rendered("redirect-v4-local-exclude-tls")
    assert [r.spec for r in local.rules if r.chain == "OUTPUT"] == [
        ("-m", "owner", "!", "--uid-owner", "proxy", "-j", "SLUICE-3128")]
    assert not [r for r in rendered("redirect-default").rules if r.chain == "OUTPUT"]


def test_tproxy_targets_the_tproxy_listener_with_routes_for_each_family():
    ruleset = rendered("tproxy-both-families")
    assert ruleset.port == 8081 and ruleset.table == "mangle"
    assert [r.add[:3] for r in ruleset.routes] == [("ip", "route", "add"), ("ip", "rule", "add"),
                                                   ("ip", "-6", "route"), ("ip", "-6", "rule")]
    table = str(netfilter.route_table(8081))
    assert all(r.add[-1] == table for r in ruleset.routes)


# --- cleanup, from what the tools print ---------------------------------------------------

NAT_V4 = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N SLUICE-8080
-N SLUICE-9090
-A PREROUTING -i eth9 -j SLUICE-8080
-A PREROUTING -i eth1 -j SLUICE-8080
-A PREROUTING -i eth1 -j SLUICE-9090
-A PREROUTING -p tcp -m tcp --dport 25 -j REDIRECT --to-ports 2525
-A OUTPUT -m owner ! --uid-owner 999 -j SLUICE-8080
-A POSTROUTING -o eth0 -j MASQUERADE
-A SLUICE-8080 -m addrtype --dst-type LOCAL -j RETURN
-A SLUICE-8080 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080
-A SLUICE-9090 -m addrtype --dst-type LOCAL -j RETURN
"""
NAT_V6_ONLY_OURS = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N SLUICE-8080
-N SLUICE-8080-CREATED
-A PREROUTING -i eth1 -j SLUICE-8080
-A SLUICE-8080 -m addrtype --dst-type LOCAL -j RETURN
"""
EMPTY = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
IP_RULES = """\
0:\tfrom all lookup local
32764:\tfrom all fwmark 0x1 lookup 100
32765:\tfrom all fwmark 0x5c/0xff lookup 108080
32766:\tfrom all lookup main
32767:\tfrom all lookup default
"""


def state(nft=True, v6=NAT_V6_ONLY_OURS):
    return netfilter.State(
        listings={(4, "nat"): NAT_V4, (4, "mangle"): EMPTY, (6, "nat"): v6, (6, "mangle"): None},
        ip_rules={4: IP_RULES, 6: "0:\tfrom all lookup local\n"},
        routes={4: "local default dev lo scope host\n", 6: None}, nft=nft,
        tables={(4, "nat"): True, (4, "mangle"): True, (6, "nat"): True, (6, "mangle"): False})


def test_cleanup_removes_every_jump_to_the_chain_and_nothing_else():
    steps = [shlex.join(argv) for argv in netfilter.cleanup(8080, state())]
    assert steps == [
        "iptables -w -t nat -D PREROUTING -i eth9 -j SLUICE-8080",   # an interface no longer configured
        "iptables -w -t nat -D PREROUTING -i eth1 -j SLUICE-8080",
        "iptables -w -t nat -D OUTPUT -m owner '!' --uid-owner 999 -j SLUICE-8080",
        "iptables -w -t nat -F SLUICE-8080",
        "iptables -w -t nat -X SLUICE-8080",
        "ip6tables -w -t nat -D PREROUTING -i eth1 -j SLUICE-8080",
        "ip6tables -w -t nat -F SLUICE-8080",
        "ip6tables -w -t nat -X SLUICE-8080",
        "ip6tables -w -t nat -X SLUICE-8080-CREATED",
        "nft delete table ip6 nat",     # apply created it; iptables-nft would leave it, empty
        "ip rule del pref 32765 from all fwmark 0x5c/0xff lookup 108080",
        "ip route flush table 108080",
    ]


def test_cleanup_deletes_only_a_table_apply_created_and_left_empty():
    steps = [shlex.join(argv) for argv in netfilter.cleanup(8080, state(nft=False))]
    assert not [s for s in steps if s.startswith("nft")]             # iptables-legacy
    existed = NAT_V6_ONLY_OURS.replace("-N SLUICE-8080-CREATED\n", "")
    steps = [shlex.join(argv) for argv in netfilter.cleanup(8080, state(v6=existed))]
    assert not [s for s in steps if s.startswith("nft")]             # there before apply
    busy = NAT_V6_ONLY_OURS + "-A POSTROUTING -o eth0 -j MASQUERADE\n"
    steps = [shlex.join(argv) for argv in netfilter.cleanup(8080, state(v6=busy))]
    assert "ip6tables -w -t nat -X SLUICE-8080-CREATED" in steps     # the operator's since
    assert not [s for s in steps if s.startswith("nft")]
    steps = [shlex.join(argv) for argv in netfilter.cleanup(8080, state(v6=EMPTY))]
    assert not [s for s in steps if s.startswith("nft") or s.startswith("ip6tables")]


def test_plan_marks_the_tables_apply_creates():
    ruleset = rendered("tproxy-both-families")      # mangle: absent for IPv6 in state()
    steps, install = netfilter.plan(ruleset, state())
    assert [a for a in install if "-N" in a] == [
        ["iptables", "-w", "-t", "mangle", "-N", "SLUICE-8081"],
        ["ip6tables", "-w", "-t", "mangle", "-N", "SLUICE-8081-CREATED"],
        ["ip6tables", "-w", "-t", "mangle", "-N", "SLUICE-8081"]]
    ruleset = rendered("redirect-default")          # nat: the cleanup deletes the IPv6 one
    steps, install = netfilter.plan(ruleset, state())
    assert ["nft", "delete", "table", "ip6", "nat"] in steps
    assert ["ip6tables", "-w", "-t", "nat", "-N", "SLUICE-8080-CREATED"] in install
    assert ["iptables", "-w", "-t", "nat", "-N", "SLUICE-8080-CREATED"] not in install
    steps, install = netfilter.plan(ruleset, state(nft=False))
    assert install == ruleset.install()


def test_cleanup_of_nothing_is_nothing():
    clean = netfilter.State({(4, "nat"): EMPTY}, {4: IP_RULES.replace("108080", "100")},
                            {4: ""}, True)
    assert netfilter.cleanup(8080, clean) == []


# --- interfaces ---------------------------------------------------------------------------

def test_lan_interfaces_skip_loopback_the_default_route_and_link_local_only():
    addresses = {"lo": ["127.0.0.1", "::1"], "eth0": ["192.0.2.10"], "eth1": ["10.1.0.1"],
                 "eth2": ["fe80::1%eth2"], "eth3": ["fe80::2%eth3", "fd00:3::1"],
                 "docker0": [], "wg0": ["10.9.0.1", "fe80::3"]}
    assert netfilter.lan_interfaces(addresses, {"eth0"}) == ("eth1", "eth3", "wg0")
    assert netfilter.lan_interfaces(addresses, set()) == ("eth0", "eth1", "eth3", "wg0")


# --- the shipped rules files --------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_shipped_rules_files_are_what_show_renders(family):
    out = subprocess.run([sys.executable, "-m", "appliance", "iptables", "show",
                          "--format", "rules.v%d" % family, *RULES_FILES_ARGS],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    shipped = (ROOT / "iptables" / ("sluice.rules.v%d" % family)).read_text()
    assert out.stdout == shipped, "regenerate with `make iptables-rules`"


def test_restore_file_of_a_family_not_rendered_is_refused():
    ruleset = rendered("interface-names")
    with pytest.raises(netfilter.NetfilterError):
        ruleset.restore(6)
