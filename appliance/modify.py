"""Body transforms: what a script's stream callable or a ``replace`` rule makes of a body.

Owns: turning ``flow.request.stream`` / ``flow.response.stream`` callables and ``replace``
rules into one kind of value, a *transform*: ``transform(chunks) -> iterator of bytes``.  Pure:
must not touch sockets, framing, heads or logging.  ``body.py`` builds the input iterator
(reading as the transform pulls), writes each output chunk with framing it computes itself
(chunk-size lines from the bytes actually sent) and skips empty outputs.

``from_script(stream, legacy)`` accepts what a script assigned (``True`` is body.py's, not ours):
- a generator function (also a bound method or a ``functools.partial`` of one) WRAPS the
  input: ``stream(chunks)`` yields chunks.  Modern scripts get ``bytes``; legacy scripts
  (``(context, flow)`` hooks, ``legacy=True``) get ``(prefix, content, suffix)`` tuples: the
  input may yield those tuples (chunked wire pieces) or ``bytes``, offered as
  ``(b"", content, b"")``.  If the generator returns before the input is exhausted, the
  output simply ends: body.py should drain and discard the rest of the input (the framing
  it sends is recomputed, so the shorter body is complete and correct).  If the input
  raised, that same exception is re-raised, even when the script swallowed it.
- any other callable (mitmproxy 7+): called once per non-empty chunk with ``bytes`` (a legacy
  tuple gives its content) and once more with ``b""`` at the end; it returns one item, None,
  or any iterable of items (mitmproxy's ``bytes | Iterable[bytes]``: a list, a tuple, a
  generator...; a mapping is refused, not iterated).
Items, as yielded or returned: ``bytes``/``bytearray``/``memoryview`` -> bytes; ``str`` ->
latin-1; a 3-tuple ``(prefix, content, suffix)`` yielded by a generator -> its content only (prefix and suffix are
never sent); None or empty -> nothing.  Anything else is a ``StreamModifierError`` naming the
type.  Any exception raised by user code (creating the generator, per chunk, at the end, or
while closing) becomes ``StreamModifierError`` with the original as ``__cause__``; body.py
then cuts the body so that it never looks complete.

``Replacer(rules, window)``: ``(from, to, regex)`` rules, applied in order, each to the output
of the previous one, exactly like successive ``bytes.replace`` / ``re.sub`` over the whole
body (``apply``).  ``transform`` streams the same result, chunk-boundary safe:
- a literal rule holds back at most ``len(from) - 1`` bytes (only a tail that could start a
  match) and its streamed result always equals ``apply``;
- a regex rule (``to`` is an ``re.sub`` template) holds back at most ``window - 1`` bytes, and
  keeps up to ``window`` already-sent bytes as look-behind context only when the pattern
  contains ``(?<`` (else 1 byte, for ``\\b`` and ``^``).  A match is taken once ``window``
  bytes are known from where it starts.  The streamed result equals ``apply`` whenever,
  for every start position s, all the pattern examines lies in ``[s - window, s + window)``:
  the match, its lookaheads, and for ``$``/``\\Z`` the byte after the match and the one
  after that.  Otherwise matches can differ, never by rewriting sent bytes: a match longer
  than the window is cut where the bytes held end (``a+`` over a longer run of ``a`` is
  replaced piecewise), a lookahead or ``$`` beyond the window sees a body that goes on, a
  look-behind longer than the window sees fewer bytes.  Each chunk rescans the held tail.
With several rules the bound is the sum of the rules' bounds (``Replacer.bound``): rule n+1
holds back bytes that rule n already released.
"""

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

from .errors import SCRIPT_FAULTS, SluiceError

__all__ = ["CHUNK_SIZE", "Replacer", "StreamModifierError", "Transform", "chain", "chunks_of",
           "from_script"]

Transform = Callable[[Iterator], Iterator[bytes]]

CHUNK_SIZE = 4096           # non-chunked bodies are offered to scripts in pieces this size


class StreamModifierError(SluiceError):
    """A script's stream callable raised (the exception is ``__cause__``) or gave a value
    that is not a body chunk.  The body is cut; 502 if nothing was sent yet."""

    status = 502


def chunks_of(data, size=CHUNK_SIZE):
    """``data`` in slices of at most ``size`` bytes (none for empty data)."""
    return (data[i:i + size] for i in range(0, len(data), size))


def chain(*transforms):
    """One transform running ``transforms`` in order (None skipped), each fed the previous
    one's output.  A legacy script's transform must come first: only it takes tuples."""
    stages = [t for t in transforms if t is not None]

    def chained(chunks):
        for stage in stages:
            chunks = stage(chunks)
        return iter(chunks)
    return chained


# --- scripts ------------------------------------------------------------------------------

def from_script(stream, legacy=False):
    """The transform for what a script assigned to ``flow.*.stream`` (see the module doc)."""
    if isinstance(stream, bool) or not callable(stream):
        raise StreamModifierError("stream must be True, a generator function or a callable, "
                                  "not %s" % type(stream).__name__)
    name = _name(stream)
    if inspect.isgeneratorfunction(stream):
        return functools.partial(_wrap, stream, name, legacy)
    return functools.partial(_per_chunk, stream, name)


def _name(func):
    if isinstance(func, functools.partial):
        return "functools.partial(%s)" % _name(func.func)
    module = getattr(func, "__module__", None) or "?"
    qualname = getattr(func, "__qualname__", None)
    if qualname is None:
        return "%s.%s object" % (module, type(func).__qualname__)
    return "%s.%s" % (module, qualname)


def _failed(name, when, exc):
    return StreamModifierError("stream callable %s raised %s %s: %s"
                               % (name, type(exc).__name__, when, exc))


class _Source:
    """The input as a script sees it; remembers whether it ended or raised itself."""

    def __init__(self, chunks, legacy):
        self._chunks, self._legacy, self.error, self.done = iter(chunks), legacy, None, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.error is not None:
            raise self.error
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.done = True
            raise
        except BaseException as exc:
            self.error = exc
            raise
        if self._legacy and not isinstance(chunk, tuple):
            return (b"", chunk, b"")
        return chunk


def _wrap(func, name, legacy, chunks):
    source = _Source(chunks, legacy)
    try:
        gen = func(source)
    except SCRIPT_FAULTS as exc:
        raise _failed(name, "at start", exc) from exc
    try:
        yield from _pull(gen, name, "on a chunk", source)
        if source.error is not None:
            raise source.error
    finally:
        try:
            gen.close()
        except SCRIPT_FAULTS as exc:
            raise _failed(name, "while closing", exc) from exc


def _per_chunk(func, name, chunks):
    for chunk in chunks:
        content = chunk[1] if isinstance(chunk, tuple) else chunk
        if content:
            yield from _results(func, name, bytes(content), "on a chunk")
    yield from _results(func, name, b"", "at the end")


def _results(func, name, arg, when):
    try:
        result = func(arg)
    except SCRIPT_FAULTS as exc:
        raise _failed(name, when, exc) from exc
    if result is None or isinstance(result, (bytes, bytearray, memoryview, str, Mapping)) \
            or not isinstance(result, Iterable):
        result = (result,)          # one item (a mapping or other object: refused by _item)
    yield from _pull(iter(result), name, when)


def _pull(items, name, when, source=None):
    """Items of a user iterator as bytes; what the iterator raises becomes ours, unless it is
    the input's own exception passing through the script's generator."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except SCRIPT_FAULTS as exc:
            if source is not None and source.error is not None:
                raise source.error
            if source is not None and source.done:
                when = "at the end"
            raise _failed(name, when, exc) from exc
        out = _item(item, name)
        if out:
            yield out


def _item(item, name):
    """One yielded or returned item as bytes (b"" for nothing)."""
    if isinstance(item, tuple):
        if len(item) != 3:
            raise StreamModifierError("stream callable %s gave a tuple of %d items, expected "
                                      "(prefix, content, suffix)" % (name, len(item)))
        item = item[1]
    if item is None or isinstance(item, bytes):
        return item or b""
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        try:
            return item.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise StreamModifierError("stream callable %s gave a str that is not latin-1: %s"
                                      % (name, exc)) from exc
    raise StreamModifierError("stream callable %s gave %s, expected bytes"
                              % (name, type(item).__name__))


# --- replace ------------------------------------------------------------------------------

class _Literal:
    """One literal rule's state in one stream: the tail that could start a match."""

    def __init__(self, old, new):
        self.old, self.new, self.held = old, new, b""

    def feed(self, chunk, final):
        data, self.held = self.held + chunk, b""
        if final:
            return data.replace(self.old, self.new)
        parts = data.split(self.old)            # the matches bytes.replace would take
        tail = parts[-1]
        for size in range(min(len(self.old) - 1, len(tail)), 0, -1):
            if tail.endswith(self.old[:size]):
                tail, self.held = tail[:-size], tail[-size:]
                break
        parts[-1] = tail
        return self.new.join(parts)


class _Regex:
    """One regex rule's state in one stream: sent context, then the held (unsettled) tail."""

    def __init__(self, pattern, new, window):
        self.pattern, self.new, self.window = pattern, new, window
        self.literal = b"\\" not in new       # no template to expand: fast path
        self.context = window if b"(?<" in pattern.pattern else 1
        self.sent, self.held = b"", b""

    def feed(self, chunk, final):
        data = self.sent + self.held + chunk
        pos = len(self.sent)
        limit = len(data) if final else len(data) - self.window   # last settled start
        out, end = [], pos
        for match in self.pattern.finditer(data, pos):
            if match.start() > limit:
                break
            out += (data[end:match.start()],
                    self.new if self.literal else match.expand(self.new))
            end = match.end()
        cut = len(data) if final else max(end, limit + 1, pos)
        out.append(data[end:cut])
        self.sent, self.held = data[max(0, cut - self.context):cut], data[cut:]
        return b"".join(out)


class Replacer:
    """``replace`` rules compiled once; ``transform`` and ``apply`` (see the module doc).
    Bad rules raise ValueError naming the rule's index."""

    def __init__(self, rules, window=64 * 1024):
        if not isinstance(window, int) or window < 1:
            raise ValueError("window must be a positive number of bytes, not %r" % (window,))
        self.window, self._rules = window, []
        for index, (old, new, regex) in enumerate(rules):
            self._rules.append(self._compile(index, old, new, regex))
        self.bound = sum(window - 1 if regex else len(old) - 1 for old, _, regex in self._rules)

    @staticmethod
    def _compile(index, old, new, regex):
        if not isinstance(old, bytes) or not isinstance(new, bytes):
            raise ValueError("replace rule %d: from and to must be bytes" % index)
        if not old:
            raise ValueError("replace rule %d: from is empty" % index)
        if not regex:
            return (old, new, False)
        try:
            pattern = re.compile(old)
            groups = {number: name for name, number in pattern.groupindex.items()}
            dummy = b"".join(b"(?P<%s>)" % groups[n].encode() if n in groups else b"()"
                             for n in range(1, pattern.groups + 1))
            re.compile(dummy).sub(new, b"")     # checks the template's group references
        except (re.error, IndexError) as exc:     # IndexError: unknown group name (3.11)
            raise ValueError("replace rule %d: %s" % (index, exc)) from exc
        return (pattern, new, True)

    def apply(self, body):
        """The whole body with every rule applied in order."""
        for old, new, regex in self._rules:
            body = old.sub(new, body) if regex else body.replace(old, new)
        return body

    def transform(self, chunks):
        """The same result as ``apply``, streamed; at most ``bound`` bytes held back."""
        stages = [_Regex(old, new, self.window) if regex else _Literal(old, new)
                  for old, new, regex in self._rules]
        for chunk in chunks:
            for stage in stages:
                chunk = stage.feed(chunk, False)
            if chunk:
                yield chunk
        chunk = b""
        for stage in stages:
            chunk = stage.feed(chunk, True)
        if chunk:
            yield chunk
