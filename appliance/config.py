"""Configuration: YAML (plus ``--set`` overrides) into frozen dataclasses.

Owns: the option names, their types, defaults and syntax (sizes ``3m``, durations ``10s``),
and error messages that name the file, line and key.  Must not touch: sockets, logging
setup, anything that runs.

Option names follow mitmproxy where one exists (``stream_large_bodies``,
``stream_websockets``, ``body_size_limit``).  Every size option takes the same syntax, and
every duration option too, because each field declares its kind and one converter per kind
does the parsing.
"""

import dataclasses
import ipaddress
import re
import typing

import yaml

from .errors import ConfigError

KiB = 1024
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)[bB]?")
_SIZE_UNITS = {"": 1, "k": KiB, "m": KiB ** 2, "g": KiB ** 3}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}
MODES = ("transparent", "regular", "tproxy")
RELAYS = ("splice", "copy")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOGS = ("off", "text", "json")
METHODS = ("redirect", "tproxy")
METHOD_MODES = {"redirect": "transparent", "tproxy": "tproxy"}   # intercept.method -> listen.mode
_IFNAME = re.compile(r"[^\s/:]{1,15}")                       # Linux: IFNAMSIZ - 1, no / : space
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")


class _Invalid(Exception):
    """A value that does not fit its option; the loader adds file, line and key."""


InvalidValue = _Invalid      # for the rules module, which shares parse_size


# --- value converters, one per kind ------------------------------------------------------

def parse_size(value):
    """``3m`` -> 3145728.  Plain bytes or k/m/g (powers of 1024), either case."""
    if isinstance(value, bool):
        raise _Invalid("expected a size like 512k or 3m, got %r" % (value,))
    if isinstance(value, int):
        if value < 0:
            raise _Invalid("a size cannot be negative: %r" % (value,))
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            if "." in number and not unit:
                raise _Invalid("a fraction of a byte: %r" % (value,))
            return int(float(number) * _SIZE_UNITS[unit.lower()])
        if value.strip().startswith("-"):
            raise _Invalid("a size cannot be negative: %r" % (value,))
    raise _Invalid("expected a size like 512k or 3m, got %r" % (value,))


def parse_duration(value):
    """``500ms`` -> 0.5, ``10s`` -> 10.0, ``2m`` -> 120.0; a plain number is seconds."""
    if isinstance(value, bool):
        raise _Invalid("expected a duration like 500ms or 10s, got %r" % (value,))
    if isinstance(value, (int, float)):
        if value < 0:
            raise _Invalid("a duration cannot be negative: %r" % (value,))
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise _Invalid("expected a duration like 500ms or 10s, got %r" % (value,))


def _parse_int(value, low=0, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("expected a whole number, got %r" % (value,))
    if value < low or (high is not None and value > high):
        raise _Invalid("%r is out of range (%s..%s)" % (value, low, high if high else ""))
    return value


def _positive(value):
    if value <= 0:
        raise _Invalid("must be more than 0")
    return value


def _parse_bool(value):
    if not isinstance(value, bool):
        raise _Invalid("expected true or false, got %r" % (value,))
    return value


def _parse_str(value):
    if not isinstance(value, str):
        raise _Invalid("expected a string, got %r" % (value,))
    if any(c in value for c in "\r\n\0"):
        raise _Invalid("CR, LF or NUL in %r" % (value,))
    return value


def _choice(options):
    def parse(value):
        if value not in options:
            raise _Invalid("expected one of %s, got %r" % (", ".join(options), value))
        return value
    return parse


def _access_log(value):
    """YAML reads a bare ``off`` as false: accept it as "off"."""
    if value is False:
        return "off"
    return _choice(ACCESS_LOGS)(value)


def _optional(parse):
    def parse_optional(value):
        return None if value is None else parse(value)
    return parse_optional


def _str_list(value):
    if not isinstance(value, list):
        raise _Invalid("expected a list, got %r" % (value,))
    return tuple(_parse_str(item) for item in value)


def _port_list(value):
    if not isinstance(value, list):
        raise _Invalid("expected a list of TCP ports, got %r" % (value,))
    ports = tuple(_parse_int(item, 1, 65535) for item in value)
    if len(set(ports)) != len(ports):
        raise _Invalid("a port is listed twice: %r" % (value,))
    return ports


def _interface_list(value):
    if not isinstance(value, list) or not value:
        raise _Invalid("expected a non-empty list of interface names (null: detect them)")
    names = tuple(_parse_str(item) for item in value)
    for name in names:
        if not _IFNAME.fullmatch(name) or name in (".", ".."):
            raise _Invalid("not an interface name: %r" % (name,))
        if name == "lo":
            raise _Invalid("lo is never a LAN side (local: true intercepts the box's own traffic)")
    if len(set(names)) != len(names):
        raise _Invalid("an interface is listed twice: %r" % (value,))
    return names


def _cidr_list(value):
    if not isinstance(value, list):
        raise _Invalid("expected a list of CIDRs, got %r" % (value,))
    nets = []
    for item in value:
        try:
            nets.append(str(ipaddress.ip_network(_parse_str(item).strip())))
        except ValueError as exc:
            raise _Invalid("not a CIDR: %s" % exc) from None
    if len(set(nets)) != len(nets):
        raise _Invalid("a CIDR is listed twice: %r" % (value,))
    return tuple(nets)


def _user_name(value):
    if not isinstance(value, str) or not _USER.fullmatch(value):
        raise _Invalid("expected a user name or numeric uid as a string, got %r" % (value,))
    return value


def _rules(value):
    """Only the shape here; ``rules.py`` compiles and checks each rule (header values
    without CR/LF among them) and ``policy.py`` reports its faults with their lines."""
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise _Invalid("expected a list of rule mappings")
    return tuple(value)


def _opt(default, parse, doc):
    return dataclasses.field(default=default, metadata={"parse": parse, "doc": doc})


def _section(cls, doc):
    return dataclasses.field(default_factory=cls, metadata={"section": cls, "doc": doc})


def _optional_section(cls, doc):
    """A section that is absent (None) unless the file has it; ``{}`` gives its defaults."""
    return dataclasses.field(default=None, metadata={"section": cls, "optional": True,
                                                     "doc": doc})


# --- the schema ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Listen:
    host: str = _opt("127.0.0.1", _parse_str, "address to listen on; '::' is dual stack")
    port: int = _opt(8080, lambda v: _parse_int(v, 1, 65535), "TCP port")
    mode: str = _opt("regular", _choice(MODES), "transparent | regular | tproxy")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    connect: float = _opt(10.0, parse_duration, "connecting to the origin (then 504)")
    header: float = _opt(30.0, parse_duration, "a client's whole request head (then 408)")
    idle: float = _opt(60.0, parse_duration, "no progress in either direction (then close)")
    drain: float = _opt(30.0, parse_duration, "in-flight exchanges after SIGTERM")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_header_bytes: int = _opt(64 * KiB, parse_size, "largest request/response head (431)")
    max_headers: int = _opt(100, lambda v: _parse_int(v, 1), "most fields in a head (431)")
    max_connections: int = _opt(4096, lambda v: _parse_int(v, 1), "concurrent client connections")


@dataclasses.dataclass(frozen=True)
class Record:
    dir: typing.Optional[str] = _opt(None, _optional(_parse_str), "flow store; null: off")
    max_bytes: int = _opt(KiB ** 3, parse_size, "flow store size before rotation")
    max_body_bytes: int = _opt(KiB ** 2, parse_size, "recorded bytes per body (then truncated)")
    max_message_bytes: int = _opt(KiB ** 2, parse_size,
                                  "recorded bytes per WebSocket message (then truncated)")
    segment_bytes: typing.Optional[int] = _opt(
        None, _optional(lambda v: _positive(parse_size(v))),
        "size of one store file, at most max_bytes; null: max_bytes/16, at most 64m")
    queue: int = _opt(10000, lambda v: _parse_int(v, 1),
                      "flows waiting for the disk (then dropped); past 32 MiB of "
                      "body data they wait without their bodies")

    @property
    def segment_size(self):
        """``segment_bytes``, or when null ``default_segment_bytes(max_bytes)``."""
        if self.segment_bytes is not None:
            return self.segment_bytes
        return default_segment_bytes(self.max_bytes)


def default_segment_bytes(max_bytes):
    """A sixteenth of the store, between 64k and 64m, never more than the store."""
    return min(max_bytes, max(64 * KiB, min(64 * KiB ** 2, max_bytes // 16))) or 1


@dataclasses.dataclass(frozen=True)
class Admin:
    host: str = _opt("127.0.0.1", _parse_str, "admin/metrics address")
    port: typing.Optional[int] = _opt(None, _optional(lambda v: _parse_int(v, 1, 65535)),
                                      "admin/metrics port; null: off")


_PSEUDONYM = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def _via(value):
    """``true`` (this box's host name), ``false`` (no Via) or a pseudonym token."""
    if value is True:
        import socket
        return socket.gethostname().split(".")[0] or "sluice"
    if value is False or value is None:
        return None
    if isinstance(value, str) and _PSEUDONYM.fullmatch(value):
        return value
    raise _Invalid("expected true, false or a name (a token, no spaces), got %r" % (value,))


@dataclasses.dataclass(frozen=True)
class Intercept:
    """What ``sluice iptables apply`` sends to Sluice; checked against ``listen`` on load."""
    interfaces: typing.Optional[tuple] = _opt(
        None, _optional(_interface_list),
        "LAN interfaces whose traffic is intercepted; null: every interface with an address "
        "except lo and the default route's")
    ports: tuple = _opt((80,), _port_list, "destination ports of plain HTTP")
    tls_ports: tuple = _opt((), _port_list, "destination ports of TLS, relayed untouched by SNI")
    exclude: tuple = _opt((), _cidr_list, "destination CIDRs never intercepted")
    method: str = _opt("redirect", _choice(METHODS),
                       "redirect (nat REDIRECT to the transparent listener) | tproxy "
                       "(mangle TPROXY to the tproxy listener)")
    ipv6: bool = _opt(True, _parse_bool, "intercept IPv6 too (ip6tables)")
    local: bool = _opt(False, _parse_bool,
                       "intercept the box's own outbound traffic too (redirect only)")
    user: str = _opt("sluice", _user_name,
                     "the user Sluice runs as: its own connections are never intercepted")


def _listen_list(value):
    if not isinstance(value, list) or not value:
        raise _Invalid("expected a non-empty list of {host, port, mode}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    listen: tuple = dataclasses.field(
        default=(Listen(),), metadata={"list_of": Listen, "parse": _listen_list,
                                       "doc": "listeners"})
    stream_large_bodies: typing.Optional[int] = _opt(
        1 * KiB ** 2, _optional(parse_size),
        "stream bodies larger than this; null: stream only what rules say")
    stream_websockets: bool = _opt(False, _parse_bool, "forward WebSocket frames at once")
    body_size_limit: int = _opt(64 * KiB ** 2, parse_size, "largest body ever buffered")
    relay: str = _opt("splice", _choice(RELAYS), "streamed bodies: splice (zero-copy) | copy")
    timeouts: Timeouts = _section(Timeouts, "timeouts")
    limits: Limits = _section(Limits, "limits")
    rules: tuple = _opt((), _rules, "rules: for each kind of action the first match decides")
    rules_dir: typing.Optional[str] = _opt(None, _optional(_parse_str),
                                           "a directory of further rule files (*.yaml)")
    ignore_hosts: tuple = _opt((), _str_list, "mitmproxy's option: regexes on host:port "
                                              "that are passed through untouched")
    scripts: tuple = _opt((), _str_list, "mitmproxy-compatible scripts")
    record: Record = _section(Record, "flow recording")
    admin: Admin = _section(Admin, "admin endpoint")
    via: typing.Optional[str] = _opt(
        _via(True), _via, "Via pseudonym added to every forwarded message: true (host name), false, "
                    "or a name; a request already carrying it is a loop (508)")
    forwarded: str = _opt(
        "auto", _choice(("auto", "none", "xff", "rfc7239")),
        "tell the origin the client's address: X-Forwarded-For (xff), Forwarded (rfc7239), "
        "none; auto: xff on regular listeners, none on intercepting ones")
    workers: typing.Union[int, str] = _opt(
        1, lambda v: v if v == "auto" else _parse_int(v, 1, 256),
        "worker processes: N, or auto (one per CPU); each has its own SO_REUSEPORT listeners")
    intercept: typing.Optional[Intercept] = _optional_section(
        Intercept, "interception rules for `sluice iptables`; absent or null: none")
    log_level: str = _opt("info", _choice(LOG_LEVELS), "debug | info | warning | error")
    access_log: str = _opt("text", _access_log, "one line per flow to stderr: off | text | json")


# --- loading ------------------------------------------------------------------------------

# A config or rule file expands to at most this many values, aliases counted where they
# are used: a few kilobytes of aliases ("billion laughs") otherwise take minutes and
# gigabytes, on the event loop when it is a reload.
MAX_YAML_NODES = 100_000


def _expanded_size(node, sizes):
    """How many values ``node`` is once aliases are expanded, counted over the distinct
    nodes only (``sizes`` memoises by node), so a bomb is measured at once, not built."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1                 # a recursive alias counts once (it is refused later)
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(v, sizes) for _, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, sizes) for v in node.value)
    else:
        total = 1
    sizes[id(node)] = total
    return total


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)       # libyaml: 7 times as fast


def _to_python(node, path, lines, scalar):
    """A composed YAML node -> plain Python, recording each path's line in ``lines``;
    ``scalar`` constructs a scalar node's value."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise _Duplicate(key, key_node.start_mark.line + 1)
            out[key] = _to_python(value_node, path + (key,), lines, scalar)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), lines, scalar) for i, item in enumerate(node.value)]
    return scalar(node)




class _Duplicate(Exception):
    def __init__(self, key, line):
        super().__init__(key)
        self.key, self.line = key, line


class _Builder:
    """Validate a plain tree into dataclasses, collecting every problem."""

    def __init__(self, source, lines, override_paths):
        self.source = source
        self.lines = lines
        self.overrides = override_paths
        self.problems = []

    def where(self, path):
        if path in self.overrides:
            return "--set"
        for cut in range(len(path), -1, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                return "%s:%d" % (self.source, line)
        return self.source

    def problem(self, path, message):
        key = ".".join(str(p) for p in path)
        self.problems.append("%s: %s: %s" % (self.where(path), key or "config", message))

    def build(self, cls, tree, path):
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            self.problem(path, "expected a mapping, got %r" % (tree,))
            return cls()
        names = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in tree.items():
            field = names.get(key)
            if field is None:
                self.problem(path + (key,), "unknown option (known: %s)" % ", ".join(names))
                continue
            converted = self.convert(field, value, path + (key,))
            if converted is not _Invalid:
                values[key] = converted
        return cls(**values)

    def convert(self, field, value, path):
        meta = field.metadata
        if "section" in meta:
            if value is None and meta.get("optional"):
                return None
            return self.build(meta["section"], value, path)
        try:
            value = meta["parse"](value)
        except _Invalid as exc:
            self.problem(path, str(exc))
            return _Invalid
        if "list_of" in meta:
            return tuple(self.build(meta["list_of"], item, path + (i,))
                         for i, item in enumerate(value))
        return value


def _parse_override(text):
    """``NAME=VALUE`` -> (path tuple, value parsed as a YAML scalar)."""
    name, eq, raw = text.partition("=")
    if not eq or not name.strip():
        raise ConfigError(["--set %s: expected NAME=VALUE" % text])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(["--set %s: %s" % (text, exc)]) from exc
    return tuple(name.strip().split(".")), value


def read_yaml(path=None, text=None):
    """(plain tree, {path tuple: line}) of a YAML file or text; ``ConfigError`` naming the
    file and line when it cannot be read or parsed."""
    source = path or "<default>"
    lines = {}
    if path is not None and text is None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ConfigError(["%s: cannot read: %s" % (path, exc.strerror)]) from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(["%s:%d: not UTF-8 text (byte 0x%02x at offset %d)" % (
                path, data[:exc.start].count(b"\n") + 1, data[exc.start], exc.start)]) from None
    if text is None:
        return {}, lines
    try:
        node = yaml.compose(text, Loader=_LOADER)
        if node is None:
            return None, lines
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(["%s: more than %d values once aliases are expanded" % (
                source, MAX_YAML_NODES)])
        return _to_python(node, (), lines, yaml.constructor.SafeConstructor().construct_object), lines
    except _Duplicate as exc:
        raise ConfigError(["%s:%d: %s: duplicate key" % (source, exc.line, exc.key)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = ":%d" % (mark.line + 1) if mark is not None else ""
        raise ConfigError(["%s%s: invalid YAML: %s" % (
            source, line, getattr(exc, "problem", None) or exc)]) from None


def load(path=None, text=None, overrides=()):
    """Return the effective ``Config``: the file (or the embedded default), then overrides.

    Raises ``ConfigError`` with every problem found, each as ``FILE:LINE: key: message``.
    """
    return load_with_lines(path, text, overrides)[0]


def load_with_lines(path=None, text=None, overrides=()):
    """(``Config``, where) where ``where(path tuple)`` says ``FILE:LINE`` (or ``--set``) for
    a value of the file, so that later checks (rules) can name it."""
    source = path or "<default>"
    tree, lines = read_yaml(path, text)
    if tree is None:
        tree = {}
    override_paths = set()
    for item in overrides:
        opath, value = _parse_override(item)
        if not isinstance(tree, dict):
            break
        node = tree
        for part in opath[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[opath[-1]] = value
        override_paths.add(opath)
    builder = _Builder(source, lines, override_paths)
    config = builder.build(Config, tree, ())
    _check_together(config, builder)
    if not builder.problems and config.intercept is not None:
        for key, message in intercept_problems(config):
            builder.problem(("intercept",) + ((key,) if key else ()), message)
    if builder.problems:
        raise ConfigError(builder.problems)
    return config, builder.where


def _check_together(config, builder):
    """Rules between options, reported like the others."""
    segment = config.record.segment_bytes
    if segment is not None and segment > config.record.max_bytes:
        builder.problem(("record", "segment_bytes"), "%d is more than record.max_bytes (%d)"
                        % (segment, config.record.max_bytes))


def intercept_listener(config):
    """The ``listen`` entry that ``intercept.method`` sends traffic to: the first one of the
    matching mode (transparent for redirect, tproxy for tproxy), or None."""
    mode = METHOD_MODES[config.intercept.method]
    return next((listen for listen in config.listen if listen.mode == mode), None)


WILDCARDS = {"::": {4, 6}, "0.0.0.0": {4}}  # listener host -> families it accepts


def intercept_problems(config):
    """(key, message) for every ``intercept`` combination that cannot work, so that no
    option is accepted that would do nothing."""
    icpt = config.intercept
    out = []
    listen = intercept_listener(config)
    if listen is None:
        out.append(("method", "method %s needs a listen entry with mode %s" % (
            icpt.method, METHOD_MODES[icpt.method])))
    elif listen.host not in WILDCARDS:
        out.append(("method", "the %s listener is on %s: intercepted connections arrive on "
                    "the LAN interface's address, so it must listen on '::' or '0.0.0.0'" % (
                        listen.mode, listen.host)))
    elif icpt.ipv6 and 6 not in WILDCARDS[listen.host]:
        out.append(("ipv6", "ipv6: true, but the %s listener on %s takes IPv4 only; "
                    "listen on '::' or set ipv6: false" % (listen.mode, listen.host)))
    if not icpt.ports and not icpt.tls_ports:
        out.append(("ports", "no port to intercept: ports and tls_ports are both empty"))
    both = sorted(set(icpt.ports) & set(icpt.tls_ports))
    if both:
        out.append(("tls_ports", "listed in ports and tls_ports: %s" % both))
    if not icpt.ipv6:
        v6 = [net for net in icpt.exclude if ":" in net]
        if v6:
            out.append(("exclude", "IPv6 CIDRs with ipv6: false exclude nothing: %s" % v6))
    if icpt.local and icpt.method != "redirect":
        out.append(("local", "local: true works with method redirect only"))
    return out


def to_plain(config):
    """A ``Config`` as plain data (for printing the effective configuration)."""
    return dataclasses.asdict(config)


def describe():
    """(dotted name, default, doc) for every option, for docs and ``etc/sluice.yaml``."""
    out = []

    def walk(cls, prefix):
        for field in dataclasses.fields(cls):
            if "section" in field.metadata:
                walk(field.metadata["section"], prefix + field.name + ".")
            else:
                default = field.default if field.default is not dataclasses.MISSING else None
                out.append((prefix + field.name, default, field.metadata.get("doc", "")))
    walk(Config, "")
    return out
