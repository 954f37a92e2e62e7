"""The ``sluice`` command: subcommands to exit codes.

Owns: argument parsing and what each subcommand prints.  Must not touch: sockets, HTTP;
``run`` hands the loaded configuration to ``appliance.server``.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

import argparse
import sys

import yaml

from . import __version__, config, flowsview, policy, rulestest, top

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _common(parser):
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML configuration (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE", help="override an option, e.g. timeouts.idle=2m")
    parser.add_argument("--stream", metavar="SIZE",
                        help="alias of --set stream_large_bodies=SIZE")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sluice", description="Transparent HTTP proxy appliance: buffer or stream "
                                   "every body.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text in (("run", "run the proxy in the foreground, logging to stderr"),
                       ("check", "validate the configuration, rules and scripts (exit 2 on "
                                 "errors)"),
                       ("config", "print the effective configuration as YAML")):
        command = sub.add_parser(name, help=text, description=text)
        _common(command)
        if name in ("run", "check"):
            command.add_argument("-s", "--script", dest="scripts", action="append", default=[],
                                 metavar="FILE", help="load a script (repeatable), as "
                                                      "mitmdump -s")
    sub.add_parser("version", help="print the version")
    text = "rules: try what the rules decide for a URL before a reload"
    rules = sub.add_parser("rules", help=text, description=text)
    rules_actions = rules.add_subparsers(dest="action", metavar="ACTION")
    rules_actions.required = True
    rulestest.add_arguments(rules_actions.add_parser(
        "test", help="which rules match URL and what Sluice would decide"), _common)
    text = "list, filter, follow or export (HAR, pcap) the recorded flows"
    flowsview.add_arguments(sub.add_parser("flows", help=text, description=text))
    text = "live view of the open transfers, from a running Sluice's admin endpoint"
    top.add_arguments(sub.add_parser("top", help=text, description=text))
    _iptables_parser(sub)
    return parser


def _iptables_parser(sub):
    text = "interception rules from the intercept section (appliance.netfilter does the work)"
    ipt = sub.add_parser("iptables", help=text, description=text)
    actions = ipt.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, help_text in (
            ("apply", "clean up, add the rules, set the sysctls (idempotent)"),
            ("remove", "remove every rule an apply added (sysctls stay)"),
            ("show", "print what apply would run, or the rules as an iptables-restore file")):
        action = actions.add_parser(name, help=help_text, description=help_text)
        _common(action)
        if name == "show":
            action.add_argument("--format", choices=("commands", "rules.v4", "rules.v6"),
                                default="commands", help="default: commands")


def _overrides(args):
    overrides = list(args.overrides)
    if args.stream is not None:
        overrides.append("stream_large_bodies=%s" % args.stream)
    return overrides


def load_config(args):
    return config.load(args.config, overrides=_overrides(args))


def load_policy(args):
    """The whole policy: config, rules (inline and rules_dir) and scripts (config and -s)."""
    return policy.load(args.config, _overrides(args), getattr(args, "scripts", ()))


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print("sluice %s" % __version__)
        return EXIT_OK
    if args.command == "flows":
        return flowsview.run(args)
    if args.command == "top":
        return top.run(args)
    try:
        if args.command in ("run", "check", "rules"):
            loaded = load_policy(args)
            cfg = loaded.cfg
        else:
            cfg = load_config(args)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print("%s: ok (%d rules, %d scripts)" % (args.config or "<default>",
                                                  len(loaded.rules.rules),
                                                  len(loaded.hooks.scripts)))
        return EXIT_OK
    if args.command == "rules":
        return rulestest.run(args, loaded)
    if args.command == "config":
        yaml.safe_dump(_plain(config.to_plain(cfg)), sys.stdout, sort_keys=False)
        return EXIT_OK
    if args.command == "iptables":
        return _iptables(args, cfg)
    from . import server
    return server.run(loaded, lambda: load_policy(args))


def _iptables(args, cfg):
    from . import netfilter
    if cfg.intercept is None:
        print("%s: no intercept section: nothing to do for sluice iptables" % (
            args.config or "<default>"), file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.action == "show":
            netfilter.show(cfg, sys.stdout, args.format)
        elif args.action == "apply":
            netfilter.apply(cfg, sys.stdout)
        elif netfilter.remove(cfg, sys.stdout):
            return EXIT_FAILURE
    except netfilter.NetfilterError as exc:
        print("sluice iptables %s: %s" % (args.action, exc), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _plain(value):
    """Tuples to lists, so the YAML printed is plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
