"""``sluice rules test URL``: which rules match a request and what Sluice would decide.

Owns: turning a URL and a few facts (client, destination, method, content type) into the
rules' decisions at every stage, printed for a person.  Pure apart from printing (and a
name lookup when the destination is not given).  Lets an operator try an edit of the rules
before a reload.
"""

import ipaddress
import socket
import sys
from urllib.parse import urlsplit

from .policy import host_of
from .rules import Facts, normal_path

EXIT_OK, EXIT_USAGE = 0, 2


def add_arguments(parser, common):
    common(parser)
    parser.add_argument("url", help="http://host[:port]/path?query")
    parser.add_argument("--client", metavar="IP", help="the client's address")
    parser.add_argument("--dest", metavar="IP",
                        help="the original destination (default: the URL's host, resolved)")
    parser.add_argument("--method", default="GET", help="default: GET")
    parser.add_argument("--content-type", metavar="TYPE", help="the response's Content-Type")


def _facts(args, rules, out):
    url = urlsplit(args.url if "://" in args.url else "http://" + args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("expected http://host[:port]/path, got %r" % args.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    dest = args.dest
    if dest is None and any("dest" in rule.keys for rule in rules.rules):
        dest = _resolve(url.hostname, port, out)
    ctype = None
    if args.content_type:
        ctype = args.content_type.split(";", 1)[0].strip().lower()
    return Facts(args.client, dest, port, host=host_of(url.hostname),
                 path=normal_path(url.path or "/"),
                 method=args.method.lower(), content_type=ctype)


def _resolve(host, port, out):
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        print("note: %s does not resolve here; rules matching on dest do not match (give "
              "--dest)" % host, file=out)
        return None


def _show(kind, value):
    """An action's value for a person."""
    name = kind if isinstance(kind, str) else kind[0]
    text = lambda b: b.decode("latin-1")          # noqa: E731
    if name == "set_headers":
        return ", ".join("%s: %s" % (text(k), text(v)) for k, v in value)
    if name == "remove_headers":
        return ", ".join(text(v) for v in value)
    if name == "replace":
        return ", ".join("%s -> %s%s" % (text(f), text(t), " (regex)" if r else "")
                         for f, t, r in value)
    if name == "respond":
        return "%d, %d body bytes" % (value.status, len(value.body))
    return str(value)


def run(args, policy, out=None):
    """Print every rule (matched or not) and each stage's decision."""
    out = out or sys.stdout
    rules = policy.rules
    try:
        facts = _facts(args, rules, out)
    except ValueError as exc:
        print("sluice rules test: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    if facts.client is None:
        print("note: no --client: rules matching on client do not match", file=out)
    print("%d rules%s" % (len(rules.rules), ", %d ignore_hosts patterns" % len(
        rules.ignore_hosts) if rules.ignore_hosts else ""), file=out)
    for rule, matched in rules.explain(facts):
        print("  %-5s %-24s stage %-8s match %s" % ("yes" if matched else "no", rule.name,
                                                    rule.stage, sorted(rule.keys) or "all"),
              file=out)
    stages = ("accept", "request", "response") if facts.content_type else ("accept", "request")
    for stage in stages:
        decision = rules.decide(stage, facts)
        print("%s:" % stage, file=out)
        if not decision:
            print("  nothing: default behaviour", file=out)
        for kind, (value, name) in decision.acts.items():
            label = kind if isinstance(kind, str) else "%s (%s)" % kind
            print("  %-28s %-30s by %s" % (label, _show(kind, value), name), file=out)
    if not facts.content_type:
        print("(give --content-type to see the response stage)", file=out)
    return EXIT_OK
