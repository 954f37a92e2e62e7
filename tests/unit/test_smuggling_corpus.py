"""The request-smuggling corpus in tests/data/smuggling/ (format: README.md there).

Each case must be refused with its exact status before any body byte of the ambiguous message
is handed out (a proxy that forwarded it would already have desynchronised the next hop),
fed whole and byte by byte, and the parser must stay dead afterwards.
"""

import pathlib
import re

import pytest

from appliance.errors import ProtocolError
from appliance.http1 import Data, RequestHead, RequestParser

from .conftest import check_dead, drive

CORPUS = pathlib.Path(__file__).resolve().parent.parent / "data" / "smuggling"
MIN_CASES = 35

_ESCAPE = re.compile(rb"\\(?:x([0-9a-fA-F]{2})|(.))")
_SIMPLE = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"\\": b"\\"}


def unescape(text):
    def one(match):
        if match.group(1):
            return bytes([int(match.group(1), 16)])
        if match.group(2) in _SIMPLE:
            return _SIMPLE[match.group(2)]
        raise ValueError("unknown escape %r" % match.group(0))
    return _ESCAPE.sub(one, text)


def load(path):
    """(directives, request bytes) of one corpus file."""
    text = path.read_bytes()
    bad = sorted({c for c in text if not (0x20 <= c <= 0x7e or c == 0x0a)})
    if bad:
        raise ValueError("%s: raw bytes %r, write them as escapes" % (path.name, bad))
    header, sep, body = text.partition(b"\n\n")
    if not sep:
        raise ValueError("%s: no empty line after the comments" % path.name)
    directives = {}
    key = None
    for line in header.split(b"\n"):
        if not line.startswith(b"#"):
            raise ValueError("%s: %r in the comment block" % (path.name, line))
        match = re.match(rb"# ([a-z-]+): (.*)", line)
        if match:
            key = match.group(1).decode()
            directives[key] = match.group(2).decode()
        elif line.startswith(b"#   ") and key:
            directives[key] += " " + line[4:].decode()
        else:
            raise ValueError("%s: bad comment line %r" % (path.name, line))
    return directives, unescape(body.replace(b"\n", b""))


def limits_of(directives):
    out = {}
    for item in directives.get("limits", "").split():
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


FILES = sorted(CORPUS.glob("*.http"))


def test_corpus_is_there():
    # A lost or renamed folder must fail, not silently run zero cases.
    assert len(FILES) >= MIN_CASES, "only %d cases in %s" % (len(FILES), CORPUS)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_file_is_well_formed(path):
    directives, raw = load(path)
    assert directives.get("attack", "").strip(), "# attack: says nothing"
    assert directives.get("expect") in ("400", "431", "505")
    assert directives.get("stage") in ("head", "body")
    assert set(directives) <= {"attack", "expect", "stage", "data-before-error", "limits"}
    assert raw


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_smuggling_case_is_refused(path, mode):
    directives, raw = load(path)
    status = int(directives["expect"])
    allowed = unescape(directives.get("data-before-error", "").encode())
    parser = RequestParser(**limits_of(directives))
    chunks = [raw] if mode == "whole" else [raw[i:i + 1] for i in range(len(raw))]
    events = []
    with pytest.raises(ProtocolError) as info:
        # No EOF is fed: the refusal must not depend on the peer closing.
        drive(parser, chunks, events=events)
    assert info.value.status == status, "%r has status %d" % (info.value, info.value.status)
    if directives["stage"] == "head":
        assert events == [], "events before a refused head: %r" % events
    else:
        assert [type(e) for e in events[:1]] == [RequestHead]
        data = b"".join(e.data for e in events if isinstance(e, Data))
        assert allowed.startswith(data), "body bytes %r got out before the error" % data
        assert all(isinstance(e, Data) for e in events[1:]), events
    check_dead(parser, type(info.value))
