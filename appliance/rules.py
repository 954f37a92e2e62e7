"""YAML rules -> compiled matchers -> decisions per stage.  Pure: no I/O, no config objects.

Owns: the rule language (match keys, actions, their types), compiling rules once per load,
and answering, for one flow at one stage, which rule decides each kind of action.  Must not
touch: sockets, heads on the wire, scripts.  ``policy.py`` loads rule files and calls this.

A rule::

    - name: video                                   # optional
      match: {host: "*.cdn.example", path: "/video/*", content_type: "video/*"}
      stream: true                                  # actions beside match

Match keys (all optional, all must match; each a glob or a list of globs, any may match):
``host`` (Host header without port, or TLS SNI; case-insensitive), ``dest`` (CIDRs of the
original destination), ``port`` (destination port: number, ``8000-8100`` or glob),
``client`` (CIDRs), ``path`` (the path, without the query), ``method``, ``content_type``
(the response's media type, without parameters; response stage only).

Stages: a rule that matches only on client/dest/port is decided at ``accept`` time, before a
byte is read (passthrough of server-first protocols); a rule with host/path/method waits for
the request head (or, for host, the TLS ClientHello); a rule with content_type is decided
when the response head arrives.  For each kind of action, the first rule in order that
carries it and matches decides.  Kinds: request_stream, response_stream, passthrough,
respond, record, and per direction replace, set_headers, remove_headers.
"""

import fnmatch
import functools
import ipaddress
import re
import urllib.parse

from .config import InvalidValue, parse_size
from .modify import Replacer

MATCH_KEYS = ("host", "dest", "port", "client", "path", "method", "content_type")
ACCEPT_KEYS = frozenset(("client", "dest", "port"))
RULE_KEYS = frozenset(("name", "match", "stream", "request_stream", "response_stream",
                       "passthrough", "replace", "set_headers", "remove_headers", "respond",
                       "record", "direction"))
DIRECTIONS = {"request": ("request",), "response": ("response",),
              "both": ("request", "response")}
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")


class RuleError(Exception):
    """A rule that cannot be compiled; ``path`` locates the value inside the rule list."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path = tuple(path)


class Facts:
    """What is known of a flow at a stage.  IPs are normalised strings; host, method and
    content_type lowercase; None where not known yet."""

    __slots__ = ("client", "dest", "port", "host", "path", "method", "content_type")

    def __init__(self, client, dest, port, host=None, path=None, method=None,
                 content_type=None):
        self.client, self.dest, self.port = client, dest, port
        self.host, self.path, self.method, self.content_type = host, path, method, content_type


class Respond:
    """A response Sluice gives itself (``respond`` action)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


# --- matchers, one per key ---------------------------------------------------------------

def normal_path(target):
    """The path of an origin-form target (str) as origins resolve it, for matching: the query
    cut, percent-escapes decoded (UTF-8), repeated slashes merged and dot segments removed
    (RFC 3986 5.2.4), so that "/%61dmin", "//admin" and "/x/../admin" are all "/admin"."""
    path = target.partition("?")[0]
    if not path.startswith("/"):
        return path                               # "*" (OPTIONS)
    if "%" in path:
        path = urllib.parse.unquote(path, errors="surrogateescape")
    if "//" not in path and "/." not in path:
        return path
    out = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == "." or (segment == "" and not last):
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _globs(value, path, lower, prepare=str):
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RuleError(path, "an empty list matches nothing")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
            raise RuleError(path + ((i,) if isinstance(value, list) else ()),
                            "expected a glob (a non-empty string), got %r" % (item,))
        text = prepare(str(item))
        text = text.lower() if lower else text
        out.append(fnmatch.translate(text))
    pattern = re.compile("|".join(out), re.S)     # the globs as one regex: one match call
    return lambda got: got is not None and pattern.match(got) is not None


def _networks(value, path):
    items = value if isinstance(value, list) else [value]
    nets = []
    for i, item in enumerate(items):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise RuleError(path + ((i,) if isinstance(value, list) else ()),
                            "not an address or CIDR: %r" % (item,)) from None
    if not nets:
        raise RuleError(path, "an empty list matches nothing")
    ranges = tuple((net.version, int(net.network_address), int(net.broadcast_address))
                   for net in nets)

    def match(ip):
        addr = _address(ip)
        if addr is None:
            return False
        version, number = addr
        for net_version, low, high in ranges:       # a loop, not any(): no generator per call
            if net_version == version and low <= number <= high:
                return True
        return False
    return match


@functools.lru_cache(maxsize=4096)
def _address(ip):
    """(version, integer) of an address string, None if it is not one; cached: a gateway's
    clients and destinations come back again and again, and ipaddress parses in Python."""
    try:
        addr = ipaddress.ip_address(ip)
    except (ValueError, TypeError):
        return None
    return addr.version, int(addr)


def _ports(value, path):
    items = value if isinstance(value, list) else [value]
    tests = []
    for i, item in enumerate(items):
        where = path + ((i,) if isinstance(value, list) else ())
        if isinstance(item, int) and not isinstance(item, bool):
            if not 1 <= item <= 65535:
                raise RuleError(where, "port %d is out of range 1-65535" % item)
            tests.append(lambda p, n=item: p == n)
        elif isinstance(item, str) and _PORT_RANGE.fullmatch(item):
            low, high = (int(x) for x in _PORT_RANGE.fullmatch(item).groups())
            if not 1 <= low <= high <= 65535:
                raise RuleError(where, "bad port range %r" % item)
            tests.append(lambda p, a=low, b=high: a <= p <= b)
        elif isinstance(item, str) and item and re.fullmatch(r"[0-9*?\[\]!-]+", item):
            pattern = re.compile(fnmatch.translate(item))
            tests.append(lambda p, r=pattern: bool(r.match(str(p))))
        else:
            raise RuleError(where, "expected a port, a range like 8000-8100 or a glob, "
                                   "got %r" % (item,))
    if not tests:
        raise RuleError(path, "an empty list matches nothing")
    return lambda port: port is not None and any(t(port) for t in tests)


_MATCHERS = {
    "host": lambda v, p: _globs(v, p, lower=True),
    "dest": _networks,
    "client": _networks,
    "port": _ports,
    "path": lambda v, p: _globs(v, p, lower=False, prepare=urllib.parse.unquote),
    "method": lambda v, p: _globs(v, p, lower=True),
    "content_type": lambda v, p: _globs(v, p, lower=True),
}


# --- actions -------------------------------------------------------------------------------

def _size(value, path):
    try:
        return parse_size(value)
    except InvalidValue as exc:
        raise RuleError(path, str(exc)) from None


def _stream(value, path):
    if isinstance(value, bool):
        return value
    return _size(value, path)


def _bool(value, path):
    if not isinstance(value, bool):
        raise RuleError(path, "expected true or false, got %r" % (value,))
    return value


def _field_name(name, path):
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise RuleError(path, "invalid header name %r" % (name,))
    return name.encode("latin-1")


def _field_value(value, path):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RuleError(path, "expected a header value (a string), got %r" % (value,))
    text = str(value)
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raise RuleError(path, "header value %r is not latin-1" % (text,)) from None
    if not _VALUE.fullmatch(raw):
        raise RuleError(path, "CR, LF or control bytes in header value %r" % (text,))
    return raw


def _set_headers(value, path):
    if not isinstance(value, dict) or not value:
        raise RuleError(path, "expected a mapping of NAME: VALUE")
    return tuple((_field_name(k, path + (k,)), _field_value(v, path + (k,)))
                 for k, v in value.items())


def _remove_headers(value, path):
    if not isinstance(value, list) or not value:
        raise RuleError(path, "expected a list of header names")
    return tuple(_field_name(v, path + (i,)).lower() for i, v in enumerate(value))


def _text(value, path, what):
    if not isinstance(value, str) or value == "":
        raise RuleError(path, "%s: expected a non-empty string, got %r" % (what, value))
    return value.encode("utf-8")


def _replace_items(value, path, default_direction):
    """-> {direction: [(from, to, regex)]}"""
    if not isinstance(value, list) or not value:
        raise RuleError(path, "expected a list of {from, to, regex?, direction?}")
    out = {}
    for i, item in enumerate(value):
        where = path + (i,)
        if not isinstance(item, dict):
            raise RuleError(where, "expected {from, to, regex?, direction?}")
        unknown = set(item) - {"from", "to", "regex", "direction"}
        if unknown:
            raise RuleError(where + (sorted(unknown)[0],), "unknown key (known: from, to, "
                                                            "regex, direction)")
        if "from" not in item or "to" not in item:
            raise RuleError(where, "replace needs both from and to")
        pattern = _text(item["from"], where + ("from",), "from")
        target = item["to"]
        if not isinstance(target, str):
            raise RuleError(where + ("to",), "expected a string, got %r" % (target,))
        regex = _bool(item.get("regex", False), where + ("regex",))
        if regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RuleError(where + ("from",), "regex does not compile: %s" % exc) from None
            try:        # `to` is a template: group references must exist in `from`
                Replacer([(pattern, target.encode("utf-8"), True)])
            except ValueError as exc:
                raise RuleError(where + ("to",), str(exc).partition(": ")[2]) from None
        for direction in _direction(item.get("direction", default_direction), where):
            out.setdefault(direction, []).append((pattern, target.encode("utf-8"), regex))
    return out


def _direction(value, path):
    if value not in DIRECTIONS:
        raise RuleError(path + ("direction",), "expected request, response or both, got %r" % (
            value,))
    return DIRECTIONS[value]


def _respond(value, path):
    if not isinstance(value, dict):
        raise RuleError(path, "expected {status, headers?, body?}")
    unknown = set(value) - {"status", "headers", "body"}
    if unknown:
        raise RuleError(path + (sorted(unknown)[0],), "unknown key (known: status, headers, body)")
    status = value.get("status", 200)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise RuleError(path + ("status",), "expected a status 200-599, got %r" % (status,))
    headers = _set_headers(value["headers"], path + ("headers",)) if "headers" in value else ()
    for name, _ in headers:
        if name.lower() in _FRAMING_FIELDS:
            raise RuleError(path + ("headers", name.decode("latin-1")),
                            "Sluice frames this response itself: %s cannot be set"
                            % name.decode("latin-1"))
    body = value.get("body", "")
    if not isinstance(body, str):
        raise RuleError(path + ("body",), "expected a string, got %r" % (body,))
    if body and status in (204, 304):
        raise RuleError(path + ("body",), "a %d response has no body" % status)
    return Respond(status, headers, body.encode("utf-8"))


# Fields that frame a message or its connection: a respond rule's answer is framed by Sluice.
_FRAMING_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"connection",
                             b"keep-alive", b"upgrade", b"trailer", b"te"))


# --- one rule --------------------------------------------------------------------------------

class Rule:
    """A compiled rule: its matchers, its stage, and its actions by kind."""

    def __init__(self, raw, index, origin=""):
        path = (index,)
        if not isinstance(raw, dict):
            raise RuleError(path, "a rule is a mapping with match: and actions")
        unknown = sorted(set(raw) - RULE_KEYS)
        if unknown:
            raise RuleError(path + (unknown[0],), "unknown key (known: %s)" % ", ".join(
                sorted(RULE_KEYS)))
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise RuleError(path + ("name",), "expected a string")
        self.name = name or "rule %d%s" % (index + 1, " of %s" % origin if origin else "")
        self.keys, self.matchers = self._compile_match(raw.get("match") or {}, path)
        if "content_type" in self.keys:
            self.stage = "response"
        elif self.keys <= ACCEPT_KEYS:
            self.stage = "accept"
        else:
            self.stage = "request"
        self.actions = self._compile_actions(raw, path)
        if not self.actions:
            raise RuleError(path, "this rule has no action (it would do nothing)")
        self._check_stage(path)

    @staticmethod
    def _compile_match(match, path):
        if not isinstance(match, dict):
            raise RuleError(path + ("match",), "expected a mapping of match keys")
        keys, matchers = set(), []
        for key, value in match.items():
            if key not in _MATCHERS:
                raise RuleError(path + ("match", key), "unknown match key (known: %s)" % (
                    ", ".join(MATCH_KEYS),))
            keys.add(key)
            matchers.append((key, _MATCHERS[key](value, path + ("match", key))))
        return frozenset(keys), tuple(matchers)

    @staticmethod
    def _compile_actions(raw, path):
        actions = {}
        if "stream" in raw:
            value = _stream(raw["stream"], path + ("stream",))
            actions["request_stream"] = actions["response_stream"] = value
        for kind in ("request_stream", "response_stream"):
            if kind in raw:
                actions[kind] = _stream(raw[kind], path + (kind,))
        for kind in ("passthrough", "record"):
            if kind in raw:
                actions[kind] = _bool(raw[kind], path + (kind,))
        if "respond" in raw:
            if raw.get("passthrough"):
                raise RuleError(path + ("respond",), "a rule either answers (respond) or "
                                                     "passes through, not both")
            actions["respond"] = _respond(raw["respond"], path + ("respond",))
        default = raw.get("direction", "response")
        directions = _direction(default, path)
        if "replace" in raw:
            for direction, items in _replace_items(raw["replace"], path + ("replace",),
                                                   default).items():
                actions[("replace", direction)] = tuple(items)
        for kind, compile_ in (("set_headers", _set_headers),
                               ("remove_headers", _remove_headers)):
            if kind in raw:
                value = compile_(raw[kind], path + (kind,))
                for direction in directions:
                    actions[(kind, direction)] = value
        if "direction" in raw and not any(isinstance(k, tuple) for k in actions):
            raise RuleError(path + ("direction",), "direction applies to replace, set_headers "
                                                   "and remove_headers; this rule has none")
        return actions

    def _check_stage(self, path):
        """Refuse actions this rule could never apply (no option that does nothing)."""
        if self.stage != "response":
            return
        for kind in self.actions:
            if kind in ("request_stream", "passthrough", "respond") or (
                    isinstance(kind, tuple) and kind[1] == "request"):
                if kind == "request_stream" and self.actions.get("response_stream") is not None:
                    continue      # `stream:` sets both; only the response half applies
                name = kind if isinstance(kind, str) else "%s (direction request)" % kind[0]
                raise RuleError(path + ("match", "content_type"),
                                "content_type is known only once the response arrives: %s "
                                "on this rule could never apply" % name)
        self.actions.pop("request_stream", None)

    def matches(self, facts):
        for key, test in self.matchers:
            if not test(getattr(facts, key)):
                return False
        return True

    def decidable(self, stage):
        return self.stage == "accept" or self.stage == stage or (
            stage == "response" and self.stage == "request")

    def __repr__(self):
        return "<Rule %s %s %s>" % (self.name, self.stage, sorted(map(str, self.actions)))


# --- the set ---------------------------------------------------------------------------------

class Decision:
    """For one stage: each action kind -> (value, rule name) of the rule that decides it."""

    __slots__ = ("acts",)

    def __init__(self):
        self.acts = {}

    def get(self, kind, default=None):
        found = self.acts.get(kind)
        return default if found is None else found[0]

    def rule(self, kind):
        found = self.acts.get(kind)
        return None if found is None else found[1]

    def names(self):
        """The rules that acted, in order, once each."""
        seen = []
        for _, name in self.acts.values():
            if name not in seen:
                seen.append(name)
        return seen

    def __bool__(self):
        return bool(self.acts)


STAGE_KINDS = {       # `record` at every stage: a flow may end before the next one
    "accept": ("passthrough", "record"),
    "tls": ("passthrough", "respond", "record"),
    "request": ("passthrough", "respond", "record", "request_stream", ("replace", "request"),
                ("set_headers", "request"), ("remove_headers", "request")),
    "response": ("response_stream", "record", ("replace", "response"),
                 ("set_headers", "response"), ("remove_headers", "response")),
}


# A flow is passed through or answered by Sluice, not both: the first rule to say wins.
_EXCLUSIVE = {"passthrough": "respond", "respond": "passthrough"}

NO_DECISION = Decision()      # what an empty rule set decides (never changed)


class RuleSet:
    """Rules in order, and the decisions they give."""

    def __init__(self, rules=(), ignore_hosts=()):
        self.rules = tuple(rules)
        self.ignore_hosts = tuple(re.compile(p, re.I) for p in ignore_hosts)
        self.empty = not self.rules and not self.ignore_hosts
        # Per stage, once per reload: the rules that can act at it, each with the action
        # kinds it has there (a TLS flow has no path or method: such rules never match it).
        self._staged = {}
        for stage, kinds in STAGE_KINDS.items():
            rule_stage = "request" if stage == "tls" else stage
            self._staged[stage] = tuple(
                (rule, tuple(k for k in kinds if k in rule.actions)) for rule in self.rules
                if rule.decidable(rule_stage) and any(k in rule.actions for k in kinds)
                and not (stage == "tls" and ("path" in rule.keys or "method" in rule.keys)))

    def decide(self, stage, facts):
        """The Decision for ``stage`` (accept, tls, request, response)."""
        if self.empty:
            return NO_DECISION
        decision = Decision()
        acts = decision.acts
        if stage != "response" and self._ignored(facts):
            acts["passthrough"] = (True, "ignore_hosts")
            return decision
        for rule, kinds in self._staged[stage]:
            if len(kinds) == 1:         # the usual rule: one action at this stage
                kind = kinds[0]
                if kind in acts or _EXCLUSIVE.get(kind) in acts or not rule.matches(facts):
                    continue
                acts[kind] = (rule.actions[kind], rule.name)
                continue
            wanted = [k for k in kinds if k not in acts and _EXCLUSIVE.get(k) not in acts]
            if not wanted or not rule.matches(facts):
                continue
            for kind in wanted:
                acts[kind] = (rule.actions[kind], rule.name)
        return decision

    def _ignored(self, facts):
        """mitmproxy's ignore_hosts: regexes on host:port (or the address:port)."""
        if not self.ignore_hosts:
            return False
        subjects = ["%s:%s" % (facts.dest, facts.port)]
        if facts.host:
            subjects.append("%s:%s" % (facts.host, facts.port))
        return any(p.search(s) for p in self.ignore_hosts for s in subjects)

    def explain(self, facts):
        """(rule, matched) for every rule, for ``sluice rules test``."""
        return [(rule, rule.matches(facts)) for rule in self.rules]


def compile_rules(raw_rules, origin=""):
    """Compile a list of rule mappings; raises RuleError with the path of the first fault
    of each rule (all faults: ``compile_all``)."""
    return [Rule(raw, i, origin) for i, raw in enumerate(raw_rules)]


def compile_all(raw_rules, origin=""):
    """(rules, [RuleError]): every rule that compiles, and the error of each that does not."""
    rules, problems = [], []
    for i, raw in enumerate(raw_rules):
        try:
            rules.append(Rule(raw, i, origin))
        except RuleError as exc:
            problems.append(exc)
    return rules, problems
