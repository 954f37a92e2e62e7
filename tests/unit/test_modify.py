"""Body transforms (appliance.modify): script stream callables and boundary-safe replace.

- the seed documents' four example scripts (../shared/seeds/examples/), loaded unchanged, and
  our own examples/ scripts, run through ``from_script`` on simulated chunks: chunked-style
  (wire pieces; legacy scripts get ``(prefix, content, suffix)`` tuples) and plain (4096-byte
  slices, as body.py offers non-chunked bodies);
- every form a script may assign, every kind of item, every error path;
- ``Replacer``: vectors, and hypothesis properties: any split of a body gives exactly
  ``apply(whole)`` (literal rules; regex rules whose matches fit the window), and whenever the
  transform asks for more input it holds back at most ``bound`` bytes.
"""

import functools
import importlib.util
import itertools
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.errors import SluiceError
from appliance.modify import (CHUNK_SIZE, Replacer, StreamModifierError, chain, chunks_of,
                              from_script)

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT.parent / "shared" / "seeds" / "examples"
EXAMPLES = ROOT / "examples"
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_loaded = itertools.count()


def load(path):
    """A script file as a fresh module, the way a script loader imports it."""
    assert path.is_file(), "missing %s (the seed examples live in ../shared/seeds/)" % path
    spec = importlib.util.spec_from_file_location("script_%d" % next(_loaded), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_flow():
    """What the headers hooks touch: ``flow.request`` / ``flow.response`` with ``stream``."""
    return SimpleNamespace(request=SimpleNamespace(stream=False, host="example.org"),
                           response=SimpleNamespace(stream=False))


class Context:
    """The legacy ``context`` argument: ``context.log(...)``."""

    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def response_stream(path, legacy):
    """Load a script, run its responseheaders hook, return what it assigned."""
    module, flow = load(path), new_flow()
    if legacy:
        module.responseheaders(Context(), flow)
    else:
        module.responseheaders(flow)
    return flow.response.stream


def wire(pieces):
    """Chunked-style input for a legacy script: each piece with its real chunk-size line."""
    return [(b"%x\r\n" % len(piece), piece, b"\r\n") for piece in pieces]


def run(transform, chunks):
    out = list(transform(iter(chunks)))
    assert all(type(chunk) is bytes and chunk for chunk in out), out
    return out


def splits(data, cuts):
    """``data`` cut at the given offsets (any order, duplicates allowed: empty pieces)."""
    bounds = [0] + sorted(c % (len(data) + 1) for c in cuts) + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# A body of more than one plain piece, with a "foo" across the 4096-byte boundary.
LONG = b"x" * (CHUNK_SIZE - 1) + b"foo" + b" foo " * 900 + b"fo"
PIECES = [b"foo", b"xfoofoo", b"fo", b"o", b"", b"bar foo"]   # "fo" + "o" split


# --- the seed documents' scripts ------------------------------------------------------------

@pytest.mark.parametrize("name, legacy", [pytest.param("stream_0_11.py", True, id="0.11"),
                                          pytest.param("stream_3x.py", False, id="3.x")])
def test_seed_stream_true(name, legacy):
    assert response_stream(SEEDS / name, legacy) is True
    with pytest.raises(StreamModifierError, match="must be True, a generator"):
        from_script(True, legacy)       # True is body.py's to handle, never a transform


def test_seed_modify_legacy_chunked():
    stream = response_stream(SEEDS / "stream_modify_0_12.py", legacy=True)
    out = run(from_script(stream, legacy=True), wire(PIECES) + [(b"0\r\n", b"", b"\r\n")])
    # The seed replaces within each chunk: the split "fo" + "o" stays (the script's own
    # limitation, which its docstring warns about); prefixes are never sent.
    assert out == [b"bar", b"xbarbar", b"fo", b"o", b"bar bar"]


@pytest.mark.parametrize("as_tuples", [True, False], ids=["tuples", "bytes"])
def test_seed_modify_legacy_plain(as_tuples):
    stream = response_stream(SEEDS / "stream_modify_0_12.py", legacy=True)
    pieces = list(chunks_of(LONG))
    chunks = [(b"", piece, b"") for piece in pieces] if as_tuples else pieces
    out = run(from_script(stream, legacy=True), chunks)
    assert out == [piece.replace(b"foo", b"bar") for piece in pieces]
    assert out[0].endswith(b"xf") and out[1].startswith(b"oo bar")


def test_seed_modify_3x():
    stream = response_stream(SEEDS / "stream_modify_3x.py", legacy=False)
    assert run(from_script(stream, legacy=False), PIECES) == [
        b"bar", b"xbarbar", b"fo", b"o", b"bar bar"]
    pieces = list(chunks_of(LONG))
    assert run(from_script(stream, False), pieces) == [p.replace(b"foo", b"bar") for p in pieces]


# --- our examples/ ---------------------------------------------------------------------------

def test_example_stream_all():
    module, flow = load(EXAMPLES / "stream_all.py"), new_flow()
    module.requestheaders(flow)
    module.responseheaders(flow)
    assert flow.request.stream is True and flow.response.stream is True


REWRITES = [pytest.param("rewrite_stream.py", False, id="generator"),
            pytest.param("rewrite_stream_legacy.py", True, id="legacy"),
            pytest.param("rewrite_per_chunk.py", False, id="per-chunk")]


@pytest.mark.parametrize("name, legacy", REWRITES)
@pytest.mark.parametrize("pieces", [PIECES, list(chunks_of(LONG)), [bytes([b]) for b in LONG],
                                    [b""], []], ids=["split", "plain", "bytewise", "empty", "none"])
def test_example_rewrites(name, legacy, pieces):
    stream = response_stream(EXAMPLES / name, legacy)
    chunks = wire(pieces) if legacy else pieces
    assert b"".join(run(from_script(stream, legacy), chunks)) == \
        b"".join(pieces).replace(b"foo", b"bar")


def test_example_legacy_logs():
    context, flow = Context(), new_flow()
    load(EXAMPLES / "rewrite_stream_legacy.py").responseheaders(context, flow)
    assert context.lines == ["rewriting the response of example.org"]


@SETTINGS
@given(body=st.binary(max_size=60).map(lambda b: bytes(b"fo "[x % 3] for x in b)),
       cuts=st.lists(st.integers(0, 60), max_size=8))
def test_example_rewrites_any_split(body, cuts):
    for path, legacy in (("rewrite_stream.py", False), ("rewrite_stream_legacy.py", True),
                         ("rewrite_per_chunk.py", False)):
        stream = response_stream(EXAMPLES / path, legacy)
        pieces = splits(body, cuts)
        out = run(from_script(stream, legacy), wire(pieces) if legacy else pieces)
        assert b"".join(out) == body.replace(b"foo", b"bar"), path


# --- generator functions ---------------------------------------------------------------------

def upper(chunks):
    for chunk in chunks:
        yield chunk.upper()


def seen_by(legacy, chunks):
    """What a generator script receives, item by item."""
    got = []

    def record(items):
        for item in items:
            got.append(item)
            yield b"."
    run(from_script(record, legacy), chunks)
    return got


def test_modern_gets_bytes_legacy_gets_tuples():
    assert seen_by(False, [b"ab", b"c"]) == [b"ab", b"c"]
    assert seen_by(True, [b"ab", b"c"]) == [(b"", b"ab", b""), (b"", b"c", b"")]
    assert seen_by(True, wire([b"ab"])) == [(b"2\r\n", b"ab", b"\r\n")]


class Addon:
    def modify(self, chunks):
        for chunk in chunks:
            yield chunk + self.suffix

    suffix = b"!"


def tagged(tag, chunks):
    for chunk in chunks:
        yield tag + chunk


@pytest.mark.parametrize("stream, expected", [
    pytest.param(upper, [b"AB", b"C"], id="function"),
    pytest.param(Addon().modify, [b"ab!", b"c!"], id="bound-method"),
    pytest.param(functools.partial(tagged, b"-"), [b"-ab", b"-c"], id="partial"),
])
def test_generator_forms(stream, expected):
    assert run(from_script(stream, legacy=False), [b"ab", b"c"]) == expected


def yields(*items):
    def gen(chunks):
        for _ in chunks:
            pass
        yield from items
    return gen


@pytest.mark.parametrize("items, expected", [
    pytest.param([b"a", bytearray(b"b"), memoryview(b"c")], [b"a", b"b", b"c"], id="bytes-like"),
    pytest.param(["caf\xe9", "x"], [b"caf\xe9", b"x"], id="str-latin-1"),
    pytest.param([(b"999\r\n", b"ab", b"\r\n"), (b"", "cd", b"")], [b"ab", b"cd"], id="tuples"),
    pytest.param([None, b"", "", (b"3\r\n", b"", b"\r\n"), b"z"], [b"z"], id="nothing-skipped"),
])
def test_yielded_items(items, expected):
    assert run(from_script(yields(*items), legacy=True), [b"in"]) == expected


@pytest.mark.parametrize("item, message", [
    pytest.param(7, "gave int, expected bytes", id="int"),
    pytest.param({b"a": 1}, "gave dict, expected bytes", id="dict"),
    pytest.param((b"", b"a"), "tuple of 2 items", id="short-tuple"),
    pytest.param((b"", (b"", b"a", b""), b""), "gave tuple, expected bytes", id="nested-tuple"),
    pytest.param("\u20ac", "str that is not latin-1", id="str-not-latin-1"),
])
def test_bad_items(item, message):
    transform = from_script(yields(b"ok", item), legacy=False)
    out = transform(iter([b"x"]))
    assert next(out) == b"ok"
    with pytest.raises(StreamModifierError, match=message) as info:
        next(out)
    assert "test_modify.yields.<locals>.gen" in str(info.value)


def test_generator_that_stops_early_leaves_the_rest_unread():
    def first_only(chunks):
        yield next(chunks)
    source = iter([b"a", b"b", b"c"])
    assert run(from_script(first_only, False), source) == [b"a"]
    assert list(source) == [b"b", b"c"]     # body.py drains and discards these


class InputFailed(Exception):
    pass


def failing_input():
    yield b"one"
    raise InputFailed("peer gone")


def swallow(chunks):
    try:
        for chunk in chunks:
            yield chunk
    except InputFailed:
        yield b"swallowed"


def reraise_other(chunks):
    try:
        for chunk in chunks:
            yield chunk
    except InputFailed:
        raise KeyError("mine")


@pytest.mark.parametrize("stream", [upper, swallow, reraise_other])
def test_input_errors_pass_through_unwrapped(stream):
    out = []
    with pytest.raises(InputFailed, match="peer gone"):
        for chunk in from_script(stream, False)(failing_input()):
            out.append(chunk)
    assert out[0] in (b"one", b"ONE")


def raises_at_start(bad, chunks):
    raise bad
    yield b""       # a generator function all the same


def raises_on_second(chunks):
    for index, chunk in enumerate(chunks):
        if index == 1:
            raise ValueError("bad chunk")
        yield chunk


def raises_at_end(chunks):
    yield from chunks
    raise RuntimeError("at end")


@pytest.mark.parametrize("stream, when, cause", [
    pytest.param(functools.partial(tagged, b"-", b"extra"), "at start", TypeError,
                 id="creation"),
    pytest.param(functools.partial(raises_at_start, OSError("boom")), "on a chunk", OSError,
                 id="first-step"),
    pytest.param(raises_on_second, "on a chunk", ValueError, id="mid-body"),
    pytest.param(raises_at_end, "at the end", RuntimeError, id="at-end"),
    pytest.param(lambda chunk: 1 / 0, "on a chunk", ZeroDivisionError, id="per-chunk"),
])
def test_user_exceptions_become_stream_modifier_errors(stream, when, cause):
    with pytest.raises(StreamModifierError) as info:
        list(from_script(stream, legacy=False)(iter([b"a", b"b"])))
    assert isinstance(info.value.__cause__, cause)
    assert isinstance(info.value, SluiceError) and info.value.status == 502
    message = str(info.value)
    assert re.match(r"stream callable (functools\.partial\()?tests\.unit\.test_modify\.", message)
    assert when in message


def test_error_while_closing_is_wrapped():
    def stubborn(chunks):
        try:
            for chunk in chunks:
                yield chunk
        finally:
            raise OSError("cleanup failed")
    out = from_script(stubborn, False)(iter([b"a", b"b"]))
    assert next(out) == b"a"
    with pytest.raises(StreamModifierError, match="while closing") as info:
        out.close()         # body.py gives up on the body (client gone)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("value", [42, "x", b"x", True, False, None])
def test_not_callable(value):
    with pytest.raises(StreamModifierError, match="not (int|str|bytes|bool|NoneType)"):
        from_script(value, legacy=False)


# --- per-chunk callables (mitmproxy 7+) --------------------------------------------------------

class Recorder:
    """A per-chunk callable that records its calls and answers from a table."""

    def __init__(self, answer):
        self.calls, self.answer = [], answer

    def __call__(self, chunk):
        self.calls.append(chunk)
        return self.answer(chunk)


@pytest.mark.parametrize("answer, expected", [
    pytest.param(lambda c: c.upper(), [b"AB", b"C"], id="bytes"),
    pytest.param(lambda c: [c, b"-"] if c else [b"end"], [b"ab", b"-", b"c", b"-", b"end"],
                 id="list"),
    pytest.param(lambda c: (x for x in (c, b"")), [b"ab", b"c"], id="generator"),
    pytest.param(lambda c: None, [], id="none"),
    pytest.param(lambda c: c.decode() if c else "t\xe9", [b"ab", b"c", b"t\xe9"], id="str"),
    # a tuple is an iterable of chunks (mitmproxy's Iterable[bytes]), not a legacy triple
    pytest.param(lambda c: (b"<", c, b">"), [b"<", b"ab", b">", b"<", b"c", b">", b"<", b">"],
                 id="tuple"),
])
def test_per_chunk(answer, expected):
    stream = Recorder(answer)
    assert run(from_script(stream, legacy=False), [b"ab", b"", b"c"]) == expected
    assert stream.calls == [b"ab", b"c", b""]     # no call for an empty chunk; b"" at the end


def test_per_chunk_legacy_tuples_give_content():
    stream = Recorder(lambda c: c)
    assert run(from_script(stream, legacy=True), wire([b"ab", b"c"])) == [b"ab", b"c"]
    assert stream.calls == [b"ab", b"c", b""]


def test_per_chunk_tail_at_end():
    held = []

    def hold_all(chunk):
        held.append(chunk)
        return b"".join(held) if not chunk else None
    assert run(from_script(hold_all, legacy=False), [b"a", b"b"]) == [b"ab"]


def failing_iterator(chunk):
    yield chunk
    raise LookupError("inside")


@pytest.mark.parametrize("stream, message, cause", [
    pytest.param(Recorder(lambda c: {"a": c}), "gave dict", None, id="dict"),
    pytest.param(Recorder(lambda c: 3), "gave int", None, id="int"),
    pytest.param(Recorder(lambda c: c if c else 1 / 0), "ZeroDivisionError at the end",
                 ZeroDivisionError, id="raises-at-end"),
    pytest.param(lambda c: failing_iterator(c), "LookupError on a chunk", LookupError,
                 id="returned-iterator"),
])
def test_per_chunk_errors(stream, message, cause):
    with pytest.raises(StreamModifierError, match=message) as info:
        list(from_script(stream, legacy=False)(iter([b"a"])))
    assert type(info.value.__cause__) is cause if cause else info.value.__cause__ is None
    assert "test_modify." in str(info.value)


def test_callable_object_is_named():
    with pytest.raises(StreamModifierError, match=r"test_modify\.Recorder object raised"):
        list(from_script(Recorder(lambda c: 1 / 0), False)(iter([b"a"])))


# --- Replacer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rules, pieces, expected", [
    pytest.param([(b"foo", b"bar", False)], [b"fo", b"o"], b"bar", id="fo+o"),
    pytest.param([(b"foo", b"bar", False)], [b"f", b"o", b"o"], b"bar", id="f+o+o"),
    pytest.param([(b"aba", b"X", False)], [b"xabab", b"a"], b"xXba", id="overlap"),
    pytest.param([(b"foo", b"bar", False), (b"bar", b"baz", False)], [b"fo", b"o bar"],
                 b"baz baz", id="in-order"),
    pytest.param([(b"bar", b"baz", False), (b"foo", b"bar", False)], [b"fo", b"o bar"],
                 b"bar baz", id="in-order-reversed"),
    pytest.param([(b"o", b"oo", False)], [b"o", b"o"], b"oooo", id="growing"),
    pytest.param([(b"f(o+)", b"<\\1>", True)], [b"xf", b"oo", b"x"], b"x<oo>x", id="regex"),
    pytest.param([(b"(?<=ab)c", b"C", True)], [b"a", b"b", b"c"], b"abC", id="lookbehind"),
    # bytewise, the cut passes every position: the look-behind must see sent bytes
    pytest.param([(b"(?<=fo)o", b"0", True)], list(chunks_of(b"xxxxxxxxfoo fooo" + b"x" * 9, 1)),
                 b"xxxxxxxxfo0 fo0o" + b"x" * 9, id="lookbehind-bytewise"),
    pytest.param([(b"x*", b"-", True)], [b"ab", b"xd"], b"-a-b--d-", id="empty-matches"),
    pytest.param([(b"o$", b"0", True)], [b"fo", b"o\n"], b"fo0\n", id="dollar"),
    pytest.param([(b"^f", b"F", True)], [b"f", b"f"], b"Ff", id="caret"),
    pytest.param([(b"(?m)^f", b"F", True)], [b"f\n", b"f"], b"F\nF", id="caret-multiline"),
    pytest.param([(b"foo", b"", True), (b"bar", b"X", False)], [b"bfo", b"oar"], b"X",
                 id="delete-then-literal"),
])
def test_replacer_vectors(rules, pieces, expected):
    replacer = Replacer(rules, window=8)
    assert replacer.apply(b"".join(pieces)) == expected
    assert b"".join(run(replacer.transform, pieces)) == expected
    assert b"".join(run(replacer.transform, [b"".join(pieces)])) == expected


def test_literal_releases_all_but_a_possible_start():
    out = Replacer([(b"foo", b"bar", False)]).transform(iter([b"abcfo", b"x", b"f"]))
    assert next(out) == b"abc"          # "fo" could start "foo"
    assert next(out) == b"fox"
    assert list(out) == [b"f"]          # the end releases the held "f"


def test_regex_match_longer_than_the_window_is_cut():
    # Documented limit: "a+" over a run of 10 bytes with a 4-byte window.  A match is taken
    # once 4 bytes are known from where it starts, so the run is replaced piecewise; nothing
    # sent is ever changed afterwards, and no byte is lost.
    replacer = Replacer([(b"a+", b"X", True)], window=4)
    assert replacer.apply(b"a" * 10) == b"X"
    assert b"".join(run(replacer.transform, [b"a"] * 10)) == b"XXX"
    assert b"".join(run(replacer.transform, [b"a" * 10])) == b"X"


def test_regex_lookahead_beyond_the_window_sees_a_body_that_goes_on():
    replacer = Replacer([(b"a(?!.{0,8}z)", b"A", True)], window=4)
    body = b"a" + b"." * 6 + b"z"
    assert replacer.apply(body) == body
    assert b"".join(run(replacer.transform, list(chunks_of(body, 1)))) == b"A" + body[1:]


@pytest.mark.parametrize("rules, window, message", [
    pytest.param([(b"", b"x", False)], 8, "rule 0: from is empty", id="empty-from"),
    pytest.param([(b"a", b"b", False), ("a", b"b", False)], 8, "rule 1: from and to must be",
                 id="str-from"),
    pytest.param([(b"(a", b"b", True)], 8, "rule 0: missing )", id="bad-regex"),
    pytest.param([(b"(a)", b"\\2", True)], 8, "invalid group reference 2", id="bad-group"),
    pytest.param([(b"(?P<x>a)", b"\\g<y>", True)], 8, "unknown group name 'y'", id="bad-name"),
    pytest.param([(b"a", b"b", True)], 0, "window must be a positive", id="window-0"),
])
def test_replacer_rejects(rules, window, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Replacer(rules, window=window)


def test_named_group_template_accepted():
    replacer = Replacer([(b"(?P<w>fo+)", b"[\\g<w>]", True)])
    assert replacer.apply(b"a foo") == b"a [foo]"


class Metered:
    """Input that checks, each time the transform asks for more, that everything it consumed
    was emitted but at most ``bound`` bytes (equal-length rules: output and input lengths
    then match byte for byte)."""

    def __init__(self, pieces, bound):
        self.pieces, self.bound, self.consumed, self.emitted = pieces, bound, 0, 0
        self.worst = 0

    def __iter__(self):
        for piece in self.pieces:
            self.check()
            self.consumed += len(piece)
            yield piece
        self.check()

    def check(self):
        self.worst = max(self.worst, self.consumed - self.emitted)
        assert self.consumed - self.emitted <= self.bound

    def run(self, transform):
        out = []
        for chunk in transform(iter(self)):
            self.emitted += len(chunk)
            out.append(chunk)
        return b"".join(out)


ALPHABET = b"fob\n a"
bodies = st.binary(max_size=120).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)] for x in b))
cut_lists = st.lists(st.integers(0, 120), max_size=12)
literal_rules = st.lists(st.tuples(
    st.binary(min_size=1, max_size=4).map(lambda b: bytes(ALPHABET[x % 3] for x in b)),
    st.binary(max_size=4).map(lambda b: bytes(b"fobX"[x % 4] for x in b)),
    st.just(False)), min_size=1, max_size=3)
# Regex rules whose matches (and everything the pattern looks at, `$` included) span at most
# 6 bytes from their start and 2 bytes before it; windows start at 7.
REGEX_RULES = [(b"f[oa]{1,3}", b"<\\g<0>>"), (b"(?<=a)b", b"B"), (b"(?<=fo)o", b""),
               (b"\\bfo\\b", b"F"), (b"o$", b"0"), (b"(?m)^a", b"A"), (b"x?", b"-"),
               (b"|a", b"_"), (b"a(?=b)", b"Ab"), (b"(a|ab)(o|bof)", b"\\2\\1"),
               (b"o{2}", b"ooo"), (b"\\Af", b"F"), (b"\n\\Z", b"$")]
regex_rules = st.lists(st.sampled_from(REGEX_RULES).map(lambda r: (*r, True)),
                       min_size=1, max_size=3)


@SETTINGS
@given(body=bodies, cuts=cut_lists,
       rules=st.lists(st.one_of(literal_rules, regex_rules), min_size=1, max_size=2)
       .map(lambda lists: [r for rules in lists for r in rules]),
       window=st.integers(7, 40))
def test_any_split_gives_the_whole_body_result(body, cuts, rules, window):
    replacer = Replacer(rules, window=window)
    expected = replacer.apply(body)
    assert b"".join(run(replacer.transform, splits(body, cuts))) == expected
    assert b"".join(run(replacer.transform, list(chunks_of(body, 1)))) == expected


EQUAL_LENGTH_REGEX = [(b"f[oa]o", b"XYZ", True), (b"(?<=a)b", b"B", True),
                      (b"\\bfo\\b", b"FO", True), (b"a(?=b)", b"A", True)]


@SETTINGS
@given(body=bodies, cuts=cut_lists, data=st.data(), window=st.integers(7, 20))
def test_holds_back_at_most_the_bound(body, cuts, data, window):
    literal = data.draw(st.lists(st.binary(min_size=1, max_size=5).map(
        lambda b: bytes(ALPHABET[x % 3] for x in b)), max_size=3))
    rules = [(old, old[::-1].upper(), False) for old in literal]
    rules += data.draw(st.lists(st.sampled_from(EQUAL_LENGTH_REGEX), max_size=2))
    replacer = Replacer(rules, window=window)
    assert replacer.bound == sum(len(old) - 1 for old in literal) + \
        (window - 1) * (len(rules) - len(literal))
    for pieces in (splits(body, cuts), list(chunks_of(body, 1))):
        meter = Metered(pieces, replacer.bound)
        assert meter.run(replacer.transform) == replacer.apply(body)
        assert meter.consumed == meter.emitted == len(body)


def test_bound_reached_and_never_passed():
    for rules, window, bound in (([(b"foo", b"bar", False)], 8, 2),
                                 ([(b"a(?=b)", b"A", True)], 8, 7),
                                 ([(b"abc", b"xyz", False), (b"q", b"r", True)], 5, 6)):
        meter = Metered([b"xxxxab", b"xfo"] + [b"a"] * 10, bound)
        replacer = Replacer(rules, window=window)
        assert replacer.bound == bound
        meter.run(replacer.transform)
        assert meter.worst == bound     # the bound is tight, not just respected


def test_large_body_literal_and_regex():
    body = LONG * 20
    replacer = Replacer([(b"foo", b"bar", False), (b"ba(r)", b"q\\1", True)])
    expected = body.replace(b"foo", b"bar").replace(b"bar", b"qr")
    assert replacer.apply(body) == expected
    assert b"".join(run(replacer.transform, list(chunks_of(body, 1000)))) == expected


# --- chain and chunks_of ------------------------------------------------------------------------

def test_chain_runs_in_order_and_skips_none():
    legacy = from_script(load(SEEDS / "stream_modify_0_12.py").modify, legacy=True)
    replacer = Replacer([(b"bar", b"baz", False)])
    transform = chain(None, legacy, replacer.transform, None)
    # the seed replaces per chunk (the split "fo" + "o" stays), then the rule runs on its output
    assert b"".join(run(transform, wire([b"fo", b"o", b"foo"]))) == b"foobaz"
    assert run(chain(), [b"a", b"b"]) == [b"a", b"b"]
    assert run(chain(None, upper), [b"a"]) == [b"A"]


def test_chunks_of():
    assert list(chunks_of(b"")) == []
    pieces = list(chunks_of(LONG))
    assert b"".join(pieces) == LONG and {len(p) for p in pieces[:-1]} == {CHUNK_SIZE}
    assert list(chunks_of(b"abcde", 2)) == [b"ab", b"cd", b"e"]
