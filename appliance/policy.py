"""The policy snapshot: config + compiled rules + loaded scripts, loaded and checked together.

Owns: reading the configuration, the inline rules and every ``rules_dir/*.yaml`` file (in
name order), compiling the rules, importing the scripts, and reporting every problem as
``FILE:LINE: message``.  A ``Policy`` never changes once built: each exchange takes the one
that is current when it starts, and SIGHUP swaps in a whole new one (``server.py``), so an
exchange in flight never sees half of a reload.  Must not touch: sockets, listeners.
"""

import glob
import logging
import os
import re

from . import config as config_mod
from .body import NO_PLAN, Plan
from .errors import ConfigError
from .hooks import Hooks, load_scripts, run_one
from .modify import Replacer, chain, from_script
from .rules import NO_DECISION, Facts, RuleSet, compile_all, normal_path

log = logging.getLogger("sluice")


class Policy:
    """An immutable snapshot; ``cfg`` is the Config, ``rules`` a RuleSet, ``hooks`` Hooks."""

    __slots__ = ("cfg", "rules", "hooks", "rule_files")

    def __init__(self, cfg, rules=None, hooks=None, rule_files=()):
        self.cfg = cfg
        self.rules = rules if rules is not None else RuleSet()
        self.hooks = hooks if hooks is not None else Hooks()
        self.rule_files = tuple(rule_files)

    def __setattr__(self, name, value):
        if hasattr(self, name):
            raise AttributeError("a Policy is immutable: load a new one")
        object.__setattr__(self, name, value)

    # --- what the snapshot says at each stage ----------------------------------------

    def request(self, flow, facts):
        """Request stage: rules decide, their header actions apply, then ``requestheaders``
        hooks run.  Returns the Decision (passthrough and respond are the caller's to act on)."""
        decision = self.rules.decide("request", facts)
        if decision is NO_DECISION and not self.hooks.requestheaders:
            return decision
        if decision:
            flow.rules.extend(decision.names())
            if decision.get("record") is False:
                flow.record = False
            if decision.get("passthrough") or decision.get("respond") is not None:
                return decision
            _apply_headers(flow.request.head.headers, decision, "request")
        if self.hooks.requestheaders:
            self.hooks.run("requestheaders", flow)
        return decision

    def response(self, flow, facts):
        """Response stage: rules (content_type known now), header actions, ``responseheaders``."""
        decision = self.rules.decide("response", facts)
        if decision is NO_DECISION and not self.hooks.responseheaders:
            return decision
        if decision:
            for name in decision.names():
                if name not in flow.rules:
                    flow.rules.append(name)
            _apply_headers(flow.response.head.headers, decision, "response")
            if decision.get("record") is False:
                flow.record = False
        if self.hooks.responseheaders:
            self.hooks.run("responseheaders", flow)
        return decision

    def plan(self, flow, message, decision, direction):
        """The body Plan for ``message`` (direction "request" or "response"): a script's stream
        (True or a callable) first, then the rule's stream/threshold, ``replace`` rules as a
        transform when streamed and on the whole body when buffered, and the ``request`` /
        ``response`` hooks once the body is buffered."""
        stream = message.stream
        hooks = getattr(self.hooks, direction)
        if not decision and not hooks and stream is False:
            return NO_PLAN
        rule_stream = decision.get(direction + "_stream")
        replace = decision.get(("replace", direction))
        replacer = Replacer(list(replace)) if replace else None
        plan = Plan()
        if callable(stream):
            plan.force, plan.reason = True, ("a script's stream callable",)
            plan.transform = from_script(stream, message.stream_legacy)
            plan.legacy = message.stream_legacy
        elif stream is True:
            plan.force, plan.reason = True, ("stream set by a script",)
        elif rule_stream is True:
            plan.force, plan.reason = True, ("rule %s: stream", decision.rule(direction + "_stream"))
        elif rule_stream is False:
            plan.force = False
        elif rule_stream is not None:
            plan.threshold = rule_stream
        if replacer is not None:
            plan.transform = chain(plan.transform, replacer.transform)
        if replacer is not None or hooks:
            def on_buffered(msg):
                if replacer is not None:
                    msg.content = replacer.apply(msg.content)
                for hook in hooks:
                    run_one(hook, flow)
            plan.on_buffered = on_buffered
        return plan

    def after_streamed(self, flow, message, direction):
        """The ``request``/``response`` hooks of a streamed body run once it has passed (its
        content reads as None)."""
        if message.streamed and getattr(self.hooks, direction):
            self.hooks.run(direction, flow)

    def error(self, flow):
        if self.hooks.error:
            self.hooks.run("error", flow)


def load(path=None, overrides=(), scripts=(), text=None):
    """The Policy of a config file (or the embedded default) plus extra ``scripts`` (``-s``).
    Raises ConfigError listing every problem of the config, the rules and the scripts."""
    cfg, where = config_mod.load_with_lines(path, text, overrides)
    problems = []
    rules, errors = compile_all(cfg.rules, origin=path or "<default>")
    for err in errors:
        dotted = ".".join(str(p) for p in ("rules",) + err.path)
        problems.append("%s: %s: %s" % (where(("rules",) + err.path), dotted, err))
    files = _rule_files(cfg.rules_dir, problems)
    for name in files:
        rules.extend(_load_rule_file(name, problems))
    problems.extend(_check_ignore_hosts(cfg, where))
    try:
        hooks = load_scripts(tuple(cfg.scripts) + tuple(scripts))
    except ConfigError as exc:
        problems.extend(exc.problems)
        hooks = None
    if problems:
        raise ConfigError(problems)
    return Policy(cfg, RuleSet(rules, cfg.ignore_hosts), hooks, files)


def _rule_files(directory, problems):
    """The rule files of ``rules_dir`` in name order.  A directory that does not exist (yet)
    holds no rules: it is created by ``make install`` and read again on every reload."""
    if directory is None:
        return []
    if not os.path.exists(directory):
        log.warning("rules_dir %s does not exist: no rule files loaded from it", directory)
        return []
    if not os.path.isdir(directory):
        problems.append("%s: rules_dir is not a directory" % directory)
        return []
    return sorted(glob.glob(os.path.join(directory, "*.yaml")))


def _load_rule_file(name, problems):
    """The rules of one file: a YAML list of rules, or a mapping with a ``rules:`` list."""
    try:
        tree, lines = config_mod.read_yaml(name)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return []
    prefix = ()
    if isinstance(tree, dict) and set(tree) == {"rules"}:
        tree, prefix = tree["rules"], ("rules",)
    if tree is None:
        return []
    if not isinstance(tree, list):
        problems.append("%s:1: expected a list of rules (or rules: [...])" % name)
        return []
    rules, errors = compile_all(tree, origin=os.path.basename(name))
    for err in errors:
        path = prefix + err.path
        line = _line(lines, path)
        problems.append("%s:%s: %s: %s" % (name, line, ".".join(map(str, path)), err))
    return rules


def _line(lines, path):
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return 1


def _check_ignore_hosts(cfg, where):
    out = []
    for i, pattern in enumerate(cfg.ignore_hosts):
        try:
            re.compile(pattern)
        except re.error as exc:
            out.append("%s: ignore_hosts.%d: regex does not compile: %s" % (
                where(("ignore_hosts", i)), i, exc))
    return out


def host_of(value):
    """The host of a Host field value (bytes or str): lowercase, without port or brackets."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        text = text.rpartition(":")[0]
    return text[:-1] if text.endswith(".") else text      # "a.example." is "a.example"


def request_facts(client, dst, head):
    """Facts of a request head: client and destination addresses, host, path, method."""
    target = head.target.decode("latin-1")
    return Facts(client[0], dst[0], dst[1], host=host_of(head.headers.get(b"host")),
                 path=normal_path(target), method=head.method.decode("latin-1").lower())


def _apply_headers(headers, decision, direction):
    for name in decision.get(("remove_headers", direction), ()):
        headers.remove(name)
    for name, value in decision.get(("set_headers", direction), ()):
        headers.set(name, value)
