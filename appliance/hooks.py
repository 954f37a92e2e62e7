"""Script hooks: load mitmproxy-compatible scripts and call their hooks safely.

Owns: importing script files, finding their hooks (module-level functions, and methods of
the objects in a module-level ``addons`` list), telling the modern signature ``(flow)`` from
the seeds' legacy ``(context, flow)`` per function, and calling hooks so that an exception
in one is logged with its traceback and the flow goes on.  Must not touch: sockets, bodies,
framing.  Hooks no script defines cost nothing: ``Hooks.<name>`` is an empty tuple.

Hook names are mitmproxy's: requestheaders, request, responseheaders, response, error,
websocket_message.  Hooks run in the proxy's event loop, one flow at a time per connection;
``sluice run`` makes the standard library's sockets, DNS and sleep cooperative (gevent's
monkey patching) when scripts are loaded, so a hook doing network I/O waits without
stalling other connections.  A hook that computes for long still holds up its own
connection's greenlet (and the process while it computes): keep hooks short.
"""

import importlib.util
import inspect
import logging
import os
import sys
import traceback

from .errors import SCRIPT_FAULTS, ConfigError

log = logging.getLogger("sluice")

HOOK_NAMES = ("requestheaders", "request", "responseheaders", "response", "error",
              "websocket_message")


class Context:
    """The ``context`` argument of legacy (mitmproxy 0.x) hooks."""

    def __init__(self, script):
        self.script = script

    def log(self, message, level="info"):
        log.log(logging.WARNING if level in ("warn", "warning", "error") else logging.INFO,
                "script %s: %s", os.path.basename(self.script), message)


class Hook:
    """One hook function of one script."""

    __slots__ = ("func", "legacy", "label", "context")

    def __init__(self, func, script, name):
        self.func = func
        self.legacy = _positional_count(func) >= 2
        self.label = "%s:%s" % (os.path.basename(script), name)
        self.context = Context(script) if self.legacy else None

    def call(self, flow, *args):
        if self.legacy:
            return self.func(self.context, flow, *args)
        return self.func(flow, *args)


def _positional_count(func):
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


class Hooks:
    """Every hook of the loaded scripts, by name, in script order."""

    def __init__(self, modules=()):
        self.scripts = tuple(path for path, _ in modules)
        self.modules = tuple(module for _, module in modules)
        found = {name: [] for name in HOOK_NAMES}
        for path, module in modules:
            for owner in [module] + list(getattr(module, "addons", []) or []):
                for name in HOOK_NAMES:
                    func = getattr(owner, name, None)
                    if callable(func):
                        found[name].append(Hook(func, path, name))
        for name in HOOK_NAMES:
            setattr(self, name, tuple(found[name]))
        self.empty = not any(found.values())

    def run(self, name, flow, *args):
        """Call every ``name`` hook on ``flow``; exceptions are logged, the flow goes on."""
        for hook in getattr(self, name):
            run_one(hook, flow, *args)


def run_one(hook, flow, *args):
    """One hook call: noted on the flow, its exception logged with the traceback."""
    flow.scripts.append(hook.label)
    before = _streams(flow)
    try:
        hook.call(flow, *args)
    except SCRIPT_FAULTS:       # the script's fault: log it, the flow goes on unmodified
        log.error("flow %s: script hook %s failed:\n%s", flow.id, hook.label,
                  traceback.format_exc().rstrip())
        return
    if hook.legacy:
        for message, old in zip((flow.request, flow.response), before):
            if message is not None and message.stream is not old and callable(message.stream):
                message.stream_legacy = True    # a (context, flow) script: tuples of chunks


def _streams(flow):
    return tuple(None if m is None else m.stream for m in (flow.request, flow.response))


def load_scripts(paths):
    """Import every script; ``ConfigError`` naming the file and line of each that fails."""
    modules, problems = [], []
    for i, path in enumerate(paths):
        try:
            modules.append((path, _import(path, i)))
        except _ScriptFailed as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return Hooks(modules)


class _ScriptFailed(Exception):
    pass


def _import(path, index):
    if not os.path.isfile(path):
        raise _ScriptFailed("%s: cannot read the script: no such file" % path)
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)       # as mitmproxy does: the script's own imports
    name = "sluice_script_%d_%s" % (index, os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise _ScriptFailed("%s:%s: %s: %s" % (path, exc.lineno, type(exc).__name__,
                                               exc.msg)) from None
    except SCRIPT_FAULTS as exc:      # anything the script raises while importing
        line = _line_in(path, exc.__traceback__)
        raise _ScriptFailed("%s:%s: %s: %s" % (path, line, type(exc).__name__, exc)) from None
    return module


def _line_in(path, tb):
    """The last line of ``path`` in a traceback (where the script failed)."""
    line = "?"
    target = os.path.abspath(path)
    for frame in traceback.extract_tb(tb):
        if os.path.abspath(frame.filename) == target:
            line = frame.lineno
    return line
