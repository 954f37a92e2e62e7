"""Interception rules: rendered from the configuration as data, then applied, removed, shown.

Owns: every exec of iptables, ip6tables, ip (rule and route), nft and sysctl in Sluice; the
chain ``SLUICE-<port>`` (named after the listener port, so two Sluices on two ports never
touch each other's rules), its jumps from PREROUTING (and OUTPUT with ``local: true``), the
tproxy fwmark rule and route table, and the forwarding sysctls.  Must not touch: sockets,
HTTP, the parsing of the configuration (it receives a loaded ``Config`` with ``intercept``).

The work is split the way sshuttle splits it (``linux.py``, ``methods/nat.py``,
``methods/tproxy.py``), with the rendering kept pure so that tests compare it with files:

- ``render(cfg, interfaces)`` -> ``Ruleset``: the chain's rules, the jumps, the routes and
  the sysctls, as data.  ``Ruleset.install()`` are the argv lists that add them, in order;
  ``Ruleset.uninstall()`` mirrors them (``-D`` for every ``-A``, in reverse).
- ``cleanup(port, state)`` -> the argv lists that remove whatever an earlier apply left, read
  from the rules in place (``iptables -S``, ``ip rule``, ``ip route show table``): every jump to
  the chain (whatever the interfaces were then), the chain, the fwmark rule, the route table.
  iptables-nft leaves a table behind once it exists, even empty: when apply had to create the
  nat or mangle table it marks it with an empty chain ``SLUICE-<port>-CREATED``, and cleanup
  deletes a table so marked if nothing else is in it, so that ``iptables-save`` reads the
  same before apply and after remove.
- ``plan(ruleset, state)`` -> (cleanup, install): ``apply`` runs them, and rolls back on a
  failure; ``remove`` runs the cleanup; ``show`` prints them, exactly.

Rule order inside the chain: ``RETURN`` for local destinations (this box's own addresses),
``RETURN`` for ``exclude``, then one ``REDIRECT``/``TPROXY`` rule per port.  Sluice's own
outbound connections never pass PREROUTING; with ``local: true`` the OUTPUT jump skips
``intercept.user``, so they are never intercepted either (no loop).
"""

import dataclasses
import ipaddress
import pwd
import shlex
import shutil
import subprocess

from . import config as config_module

CHAIN = "SLUICE-%d"
CREATED = "SLUICE-%d-CREATED"   # an empty chain: apply created this table (iptables-nft)
TOOLS = {4: "iptables", 6: "ip6tables"}
IP = {4: ["ip"], 6: ["ip", "-6"]}
NFT_FAMILY = {4: "ip", 6: "ip6"}
ANY = {4: "0.0.0.0/0", 6: "::/0"}
TABLES = ("nat", "mangle")
FWMARK = "0x5c/0xff"          # tproxy: TPROXY marks, `ip rule` routes marked packets locally
ROUTE_TABLE_BASE = 100000     # tproxy: route table ROUTE_TABLE_BASE + listener port
RUN_TIMEOUT = 30.0


class NetfilterError(Exception):
    """A command failed or the box cannot be set up; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One iptables rule: ``<tool> -w -t <table> -A <chain> <spec...>``."""
    family: int
    table: str
    chain: str
    spec: tuple

    def argv(self, action="-A"):
        return [TOOLS[self.family], "-w", "-t", self.table, action, self.chain, *self.spec]

    def restore_line(self):
        return " ".join(["-A", self.chain, *self.spec])


@dataclasses.dataclass(frozen=True)
class Route:
    """One ``ip rule`` or ``ip route`` that tproxy needs: its add and del argv."""
    family: int
    add: tuple
    delete: tuple


@dataclasses.dataclass(frozen=True)
class Ruleset:
    """Everything ``apply`` adds for one configuration, as data."""
    port: int
    method: str
    interfaces: tuple
    families: tuple
    table: str                  # nat (redirect) or mangle (tproxy)
    rules: tuple                # Rule, in the order added: the chain's body, then the jumps
    routes: tuple               # Route: the tproxy local route and fwmark rule
    sysctls: tuple              # (key, value)

    @property
    def chain(self):
        return CHAIN % self.port

    def install(self, created=()):
        """The argv lists that add everything, in order: routes before the marks that need
        them, the chain and its body before the jumps into it, sysctls last.  ``created``:
        the families whose table does not exist yet, marked as ours with an empty chain
        ``SLUICE-<port>-CREATED`` so that remove deletes the table again, and only then."""
        out = [list(route.add) for route in self.routes]
        for family in self.families:
            ipt = [TOOLS[family], "-w", "-t", self.table]
            if family in created:
                out.append(ipt + ["-N", CREATED % self.port])
            out.append(ipt + ["-N", self.chain])
        out += [rule.argv("-A") for rule in self.rules]
        out += [["sysctl", "-w", "%s=%s" % item] for item in self.sysctls]
        return out

    def uninstall(self):
        """``install`` undone, in reverse (sysctls stay): ``-D`` for each ``-A``, ``-X`` for
        each ``-N``, then each route's del."""
        out = [rule.argv("-D") for rule in reversed(self.rules)]
        out += [[TOOLS[f], "-w", "-t", self.table, "-X", self.chain]
                for f in reversed(self.families)]
        out += [list(route.delete) for route in reversed(self.routes)]
        return out

    def restore(self, family):
        """The rules of one family as an ``iptables-restore`` file (rules.v4 / rules.v6)."""
        if family not in self.families:
            raise NetfilterError("intercept.ipv6 is false: there are no IPv6 rules")
        tool = TOOLS[family]
        lines = [
            "# Sluice's interception rules for %s-restore: `sluice iptables show --format "
            "rules.v%d`." % (tool, family),
            "# Method %s to port %d; destination ports %s; LAN interfaces %s." % (
                self.method, self.port, " ".join(str(p) for p in self.ports),
                " ".join(self.interfaces)),
            "# Load with `%s-restore --noflush FILE` (adds to the rules in place), or merge "
            "into" % tool,
            "# /etc/iptables/rules.v%d (iptables-persistent).  Not in this file, set them too:"
            % family,
        ]
        lines += ["#   sysctl -w %s=%s" % (key, value) for key, value in self.sysctls
                  if _family_of(key) == family]
        lines += ["#   %s" % shlex.join(route.add) for route in self.routes
                  if route.family == family]
        lines += ["*%s" % self.table, ":%s - [0:0]" % self.chain]
        lines += [rule.restore_line() for rule in self.rules if rule.family == family]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    @property
    def ports(self):
        return sorted({int(r.spec[r.spec.index("--dport") + 1]) for r in self.rules
                       if "--dport" in r.spec})


def _family_of(key):
    return 6 if key.startswith("net.ipv6.") else 4


def _chain_body(family, icpt, port, tproxy):
    """RETURN for local destinations and excluded CIDRs, then one rule per port."""
    body = [("-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN")]
    for cidr in icpt.exclude:
        if ipaddress.ip_network(cidr).version == family:
            body.append(("-d", cidr, "-j", "RETURN"))
    for dport in sorted(set(icpt.ports) | set(icpt.tls_ports)):
        match = ("-p", "tcp", "-m", "tcp", "--dport", str(dport))
        if tproxy:
            body.append(match + ("-j", "TPROXY", "--on-port", str(port),
                                 "--tproxy-mark", FWMARK))
        else:
            body.append(match + ("-j", "REDIRECT", "--to-ports", str(port)))
    return body


def render(cfg, interfaces):
    """The ``Ruleset`` for ``cfg`` (which has ``intercept``) on the LAN ``interfaces``."""
    icpt = cfg.intercept
    port = config_module.intercept_listener(cfg).port
    tproxy = icpt.method == "tproxy"
    table, chain = ("mangle" if tproxy else "nat"), CHAIN % port
    families = (4, 6) if icpt.ipv6 else (4,)
    rules, routes = [], []
    for family in families:
        rules += [Rule(family, table, chain, spec)
                  for spec in _chain_body(family, icpt, port, tproxy)]
    for family in families:
        rules += [Rule(family, table, "PREROUTING", ("-i", name, "-j", chain))
                  for name in interfaces]
        if icpt.local:
            rules.append(Rule(family, table, "OUTPUT", (
                "-m", "owner", "!", "--uid-owner", icpt.user, "-j", chain)))
        if tproxy:
            routes += _tproxy_routes(family, port)
    return Ruleset(port, icpt.method, tuple(interfaces), families, table, tuple(rules),
                   tuple(routes), _sysctls(families, interfaces))


def route_table(port):
    return ROUTE_TABLE_BASE + port


def _tproxy_routes(family, port):
    """Packets TPROXY marked are delivered locally: a local default route in a table of
    ours, and a fwmark rule that looks it up."""
    ip, table = IP[family], str(route_table(port))
    route = ["local", ANY[family], "dev", "lo", "table", table]
    rule = ["fwmark", FWMARK, "lookup", table]
    return [Route(family, tuple(ip + ["route", "add"] + route),
                  tuple(ip + ["route", "del"] + route)),
            Route(family, tuple(ip + ["rule", "add"] + rule),
                  tuple(ip + ["rule", "del"] + rule))]


def _sysctls(families, interfaces):
    """Forwarding on; ICMP redirects off (else a client told to reach a host of its own
    network directly would bypass the gateway, and Sluice, from then on).  The effective
    send_redirects is ``all`` OR the interface's: both are set."""
    out = [("net.ipv4.ip_forward", "1")]
    if 6 in families:
        out.append(("net.ipv6.conf.all.forwarding", "1"))
    out.append(("net.ipv4.conf.all.send_redirects", "0"))
    for name in interfaces:
        if "+" not in name:  # an iptables wildcard (eth+) names no sysctl
            out.append(("net/ipv4/conf/%s/send_redirects" % name if "." in name
                        else "net.ipv4.conf.%s.send_redirects" % name, "0"))
    return tuple(out)


# --- cleanup: from the rules in place -----------------------------------------------------

@dataclasses.dataclass
class State:
    """What is in place now, as the tools print it; None where a tool could not be run."""
    listings: dict       # (family, table) -> `iptables -w -t TABLE -S` text, or None
    ip_rules: dict       # family -> `ip rule show` text, or None
    routes: dict         # family -> `ip route show table T` text, or None
    nft: bool            # iptables is the nf_tables variant (empty tables can be deleted)
    tables: dict = dataclasses.field(default_factory=dict)
    #                      (family, table) -> whether the nft table exists (nft only)


def cleanup(port, state):
    """The argv lists that remove everything an earlier apply for ``port`` left in place."""
    chain = CHAIN % port
    out = []
    for (family, table), listing in sorted(state.listings.items()):
        if listing is None:
            continue
        lines = listing.splitlines()
        ours = [line for line in lines if _is_ours(line, port)]
        ipt = [TOOLS[family], "-w", "-t", table]
        for line in ours:
            if not line.startswith("-A %s " % chain) and line.startswith("-A "):
                out.append(ipt + ["-D"] + shlex.split(line)[1:])
        if "-N %s" % chain in lines:
            out += [ipt + ["-F", chain], ipt + ["-X", chain]]
        if "-N %s" % (CREATED % port) in lines:
            out.append(ipt + ["-X", CREATED % port])
            rest = [line for line in lines if line not in ours]
            if state.nft and all(_is_accept_policy(line) for line in rest):
                out.append(["nft", "delete", "table", NFT_FAMILY[family], table])
    table = str(route_table(port))
    for family, listing in sorted(state.ip_rules.items()):
        for line in (listing or "").splitlines():
            pref, _, selector = line.partition(":")
            if selector.split()[-2:] == ["lookup", table]:
                out.append(IP[family] + ["rule", "del", "pref", pref.strip()] + selector.split())
    for family, listing in sorted(state.routes.items()):
        if listing and listing.strip():
            out.append(IP[family] + ["route", "flush", "table", table])
    return out


def plan(ruleset, state):
    """(cleanup, install): the argv lists ``apply`` runs, given the ``state`` in place.  The
    table of a family is marked as created when it does not exist once cleaned up."""
    steps = cleanup(ruleset.port, state)
    deleted = {(family, argv[-1]) for argv in steps if argv[0] == "nft"
               for family, name in NFT_FAMILY.items() if argv[-2] == name}
    created = tuple(family for family in ruleset.families if state.nft and (
        (family, ruleset.table) in deleted or state.tables.get((family, ruleset.table)) is False))
    return steps, ruleset.install(created)


def _is_ours(line, port):
    chain, words = CHAIN % port, line.split()
    return (line in ("-N %s" % chain, "-N %s" % (CREATED % port))
            or line.startswith("-A %s " % chain)
            or (words[:1] == ["-A"] and words[-2:] == ["-j", chain]))


def _is_accept_policy(line):
    words = line.split()
    return len(words) == 3 and words[0] == "-P" and words[2] == "ACCEPT"


# --- the box: interfaces, tools, state ----------------------------------------------------

def lan_interfaces(addresses, wan):
    """Pure: the names in ``addresses`` (name -> its address strings) that hold an IPv4
    address or a non-link-local IPv6 one, except loopback and the ``wan`` interfaces."""
    def usable(addr):
        ip = ipaddress.ip_address(addr.split("%")[0])
        return not ip.is_loopback and not (ip.version == 6 and ip.is_link_local)
    return tuple(sorted(name for name, addrs in addresses.items()
                        if name != "lo" and name not in wan and any(map(usable, addrs))))


def detect_interfaces():
    """(LAN interfaces, default route interfaces) of this network namespace (netifaces)."""
    import netifaces  # imported here: rendering needs no box
    wan = {entry[1] for entry in netifaces.gateways().get("default", {}).values()}
    addresses = {}
    for name in netifaces.interfaces():
        found = netifaces.ifaddresses(name)
        addresses[name] = [entry["addr"] for family in (netifaces.AF_INET, netifaces.AF_INET6)
                           for entry in found.get(family, ())]
    return lan_interfaces(addresses, wan), tuple(sorted(wan))


def resolve_interfaces(icpt):
    """(interfaces, a sentence saying where they come from) for ``intercept``."""
    if icpt.interfaces is not None:
        return icpt.interfaces, "configured"
    lan, wan = detect_interfaces()
    if not lan:
        raise NetfilterError("no LAN interface found (every interface with an address except "
                             "lo and the default route's %s): set intercept.interfaces"
                             % (" ".join(wan) or "(none)"))
    return lan, "detected: every interface with an address except lo and %s" % (
        "the default route's %s" % " ".join(wan) if wan else "(no default route)")


def _run(argv, check=True):
    """Run one command; its stdout (None if it failed and not ``check``); ``NetfilterError``
    quoting its stderr if it failed and ``check``."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetfilterError("%s: %s" % (shlex.join(argv), exc)) from exc
    if proc.returncode != 0:
        if check:
            raise NetfilterError("%s: exit %d: %s" % (shlex.join(argv), proc.returncode,
                                                      proc.stderr.strip()))
        return None
    return proc.stdout


def read_state(port):
    """What ``cleanup`` needs, read with the tools (needs root).  IPv6 is read when it can be:
    without ip6tables, or with IPv6 disabled, its listings are None."""
    listings, ip_rules, routes = {}, {}, {}
    table = str(route_table(port))
    for family in (4, 6):
        for name in TABLES:
            listings[(family, name)] = (
                _run([TOOLS[family], "-w", "-t", name, "-S"], check=family == 4)
                if shutil.which(TOOLS[family]) else None)
        ip_rules[family] = _run(IP[family] + ["rule", "show"], check=family == 4)
        routes[family] = _run(IP[family] + ["route", "show", "table", table], check=False)
    nft = "nf_tables" in _run(["iptables", "--version"]) and shutil.which("nft") is not None
    tables = {}
    if nft:
        existing = set((_run(["nft", "list", "tables"]) or "").splitlines())
        tables = {(family, name): "table %s %s" % (NFT_FAMILY[family], name) in existing
                  for family in (4, 6) for name in TABLES}
    return State(listings, ip_rules, routes, nft, tables)


def check_box(cfg, interfaces):
    """Refuse, before anything runs, what would fail half way: a missing tool, a configured
    interface this box lacks, an unknown ``user`` for ``local: true``."""
    icpt = cfg.intercept
    tools = ["iptables", "sysctl", "ip"] + (["ip6tables"] if icpt.ipv6 else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise NetfilterError("missing: %s (Debian: apt-get install iptables iproute2 procps)"
                             % " ".join(missing))
    import netifaces
    present = set(netifaces.interfaces())
    absent = [name for name in interfaces if "+" not in name and name not in present]
    if absent:
        raise NetfilterError("intercept.interfaces: no interface %s on this box"
                             % " ".join(absent))
    if icpt.local and not icpt.user.isdigit():
        try:
            pwd.getpwnam(icpt.user)
        except KeyError:
            raise NetfilterError("intercept.user: no user %r on this box (local: true exempts "
                                 "it from interception)" % icpt.user) from None


# --- apply, remove, show --------------------------------------------------------------------

def _prepare(cfg):
    if cfg.intercept is None:
        raise NetfilterError("the configuration has no intercept section")
    interfaces, origin = resolve_interfaces(cfg.intercept)
    return render(cfg, interfaces), origin


def _header(ruleset, origin):
    families = " and ".join("IPv%d" % family for family in ruleset.families)
    ports = " ".join(str(port) for port in ruleset.ports)
    return ["# chain %s: method %s to port %d, destination ports %s, %s" % (
                ruleset.chain, ruleset.method, ruleset.port, ports, families),
            "# LAN interfaces %s (%s)" % (" ".join(ruleset.interfaces), origin)]


def show(cfg, out, fmt="commands"):
    """Print what ``apply`` would run now (``commands``), or the rules as an
    iptables-restore file (``rules.v4``, ``rules.v6``)."""
    ruleset, origin = _prepare(cfg)
    if fmt != "commands":
        out.write(ruleset.restore(int(fmt[-1])))
        return
    for line in _header(ruleset, origin):
        print(line, file=out)
    try:
        steps, install = plan(ruleset, read_state(ruleset.port))
        print("# 1. clean up what an earlier apply left in place%s" % (
            "" if steps else ": nothing"), file=out)
    except NetfilterError as exc:
        steps, install = [], ruleset.install()
        print("# 1. clean up: cannot read the rules in place (%s)" % exc, file=out)
    for argv in steps:
        print(shlex.join(argv), file=out)
    print("# 2. add the rules, then set the sysctls", file=out)
    for argv in install:
        print(shlex.join(argv), file=out)


def apply(cfg, out):
    """Clean up, add the rules and set the sysctls, printing each command as it runs and
    each sysctl's old value.  On a failure, remove what was added and raise."""
    ruleset, origin = _prepare(cfg)
    check_box(cfg, ruleset.interfaces)
    for line in _header(ruleset, origin):
        print(line, file=out)
    steps, install = plan(ruleset, read_state(ruleset.port))
    for argv in steps:
        _echo_run(argv, out)
    try:
        for argv in install:
            if argv[0] == "sysctl":
                key, value = argv[2].split("=", 1)
                old = (_run(["sysctl", "-n", key], check=False) or "?").strip()
                print("# %s: %s -> %s" % (key, old, value), file=out)
            _echo_run(argv, out)
    except NetfilterError:
        failures = remove(cfg, out)
        print("# apply failed: rolled back%s" % (
            " with %d failures" % failures if failures else ""), file=out)
        raise


def remove(cfg, out):
    """Remove everything an apply for this listener port left (every step runs; each
    failure is printed).  The number of failures."""
    if cfg.intercept is None:
        raise NetfilterError("the configuration has no intercept section")
    port = config_module.intercept_listener(cfg).port
    failures = 0
    for argv in cleanup(port, read_state(port)):
        try:
            _echo_run(argv, out)
        except NetfilterError as exc:
            failures += 1
            print("# failed: %s" % exc, file=out)
    return failures


def _echo_run(argv, out):
    print(shlex.join(argv), file=out)
    out.flush()
    _run(argv)
