"""Scripts end to end: the seed documents' example scripts loaded unchanged, our own examples,
framing whatever a stream callable yields (chunked, Content-Length, HTTP/1.0 clients), hooks
that change buffered bodies, and what happens when a script fails.

The proxy runs with `-s FILE` (as mitmdump users type it) or `scripts:` in its config;
origins are scripted rawservers (exact bytes: "foo" split across chunks) and the test origin.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from tests.integration.rawclient import exchange, send
from tests.integration.test_rules import BASE, curl, dechunk, url
from tests.lab import rawserver as raw
from tests.lab.netns import ORIGIN_PORT, RAW_PORT, REPO_ROOT
from tests.lab.origin import body_sha256

SEEDS = REPO_ROOT.parent / "shared" / "seeds" / "examples"
EXAMPLES = REPO_ROOT / "examples"
MIB = 1 << 20
CHUNKS = [b"one fo", b"o two fo", b"o three foo", b" four"]
TEXT = b"".join(CHUNKS)


def seed(name):
    path = SEEDS / name
    assert path.exists(), "the seed scripts are expected in %s (CI has ../shared/)" % SEEDS
    return str(path)


def text_origin(rawserver, framing):
    """An origin answering TEXT in CHUNKS (0.1 s apart): chunked, Content-Length or close."""
    if framing == "chunked":
        steps = [raw.recv_until(), raw.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n")]
        for piece in CHUNKS:
            steps += [raw.send(b"%x\r\n%s\r\n" % (len(piece), piece)), raw.sleep(0.1)]
        return rawserver(steps + [raw.send(b"0\r\n\r\n")])
    extra = b"Content-Length: %d\r\n" % len(TEXT) if framing == "length" else b"Connection: close\r\n"
    steps = [raw.recv_until(), raw.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra + b"\r\n")]
    for piece in CHUNKS:
        steps += [raw.send(piece), raw.sleep(0.1)]
    return rawserver(steps + ([raw.close()] if framing == "close" else []))


def get(lab, version=b"1.1"):
    reply = exchange(lab, [send(b"GET /t HTTP/%s\r\nHost: o\r\nConnection: close\r\n\r\n" % version)], read_timeout=5)
    head, _, rest = reply.data.partition(b"\r\n\r\n")
    return head.lower(), rest, reply


def start(sluice, *scripts, dports=(ORIGIN_PORT, RAW_PORT), **extra):
    args = []
    for script in scripts:
        args += ["-s", script]
    return sluice(dict(BASE, **extra), extra_args=args, dports=dports)


# -- the seeds, unchanged -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stream_0_11.py", "stream_3x.py"])
def test_seed_stream_true_streams_every_response(lab, sluice, name):
    handle = start(sluice, seed(name))
    n = 3 * 1024 + 5           # small: only the script makes it streamed
    rc, digest, count, err = lab.curl_sha256(["-o", "-", url("/bytes?n=%d" % n)])
    assert (rc, count, digest) == (0, n, body_sha256(n)), err
    handle.wait_log("response: stream (stream set by a script)")


@pytest.mark.parametrize("name", ["stream_modify_0_12.py", "stream_modify_3x.py"])
@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_seed_stream_modify_rewrites_a_streamed_body(lab, sluice, rawserver, name, framing):
    start(sluice, seed(name))
    text_origin(rawserver, framing)
    head, rest, _ = get(lab)
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head, head
    # The seeds replace chunk by chunk, so a "foo" cut by a chunk boundary stays (their own
    # docstring warns of it); what reaches the client is each chunk's own replacement.
    if framing == "chunked":
        expected = b"".join(c.replace(b"foo", b"bar") for c in CHUNKS)
        assert dechunk(rest) == expected
    else:
        assert dechunk(rest).replace(b"foo", b"bar") == TEXT.replace(b"foo", b"bar")


def test_seed_legacy_modify_to_an_http10_client_is_close_delimited(lab, sluice, rawserver):
    start(sluice, seed("stream_modify_0_12.py"))
    text_origin(rawserver, "length")
    head, rest, reply = get(lab, b"1.0")
    assert b"transfer-encoding" not in head and b"content-length" not in head, head
    assert b"connection: close" in head and reply.eof and reply.recv_error is None
    assert rest.replace(b"foo", b"bar") == TEXT.replace(b"foo", b"bar")


# -- our examples ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rewrite_stream.py", "rewrite_stream_legacy.py", "rewrite_per_chunk.py"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_example_rewrites_foo_even_across_chunk_boundaries(lab, sluice, rawserver, name, framing):
    handle = start(sluice, str(EXAMPLES / name))
    text_origin(rawserver, framing)
    head, rest, _ = get(lab)
    assert dechunk(rest) == TEXT.replace(b"foo", b"bar"), rest
    if name == "rewrite_stream_legacy.py":
        assert "script rewrite_stream_legacy.py: rewriting the response of" in handle.log()


def test_example_stream_all(lab, sluice):
    handle = start(sluice, str(EXAMPLES / "stream_all.py"))
    rc, digest, count, err = lab.curl_sha256(["-o", "-", url("/chunked?n=%d&chunk=1000" % (200 * 1024))])
    assert (rc, digest) == (0, body_sha256(200 * 1024)), err
    handle.wait_log("stream set by a script")


def test_scripts_from_the_config_and_a_chunked_splice_of_a_big_body(lab, sluice):
    handle = sluice(dict(BASE, scripts=[str(EXAMPLES / "rewrite_stream.py")]), dports=(ORIGIN_PORT,))
    n = 3 * MIB
    rc, digest, count, err = lab.curl_sha256(["-o", "-", url("/bytes?n=%d" % n)])
    assert rc == 0 and count >= n - 1024, err      # binary body: a few "foo" may become "bar"
    handle.wait_log("a script's stream callable")


# -- hooks on buffered and streamed bodies ---------------------------------------------------------

HOOKS = '''
import json
class Addon:
    def request(self, flow):
        if flow.request.method == "POST":
            flow.request.content = flow.request.content.upper()
    def response(self, flow):
        if flow.response.content is not None:
            flow.response.headers["X-Seen"] = str(len(flow.response.content))
            flow.response.content = b"<" + flow.response.content + b">"
        else:
            flow.response.content = b"ignored"
addons = [Addon()]
'''


def test_hooks_change_buffered_bodies_and_lengths_follow(lab, sluice, tmp_path):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    start(sluice, str(script))
    status, headers, payload = curl(lab, "--data-binary", "hello", url("/sha256"))
    body = payload[1:-1]
    assert payload[:1] == b"<" and payload[-1:] == b">" and int(headers["content-length"]) == len(payload)
    assert json.loads(body)["sha256"] == hashlib.sha256(b"HELLO").hexdigest()
    assert headers["x-seen"] == str(len(body))


def test_change_of_a_streamed_body_is_ignored_with_one_warning(lab, sluice, tmp_path):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    handle = start(sluice, str(script))
    n = 3 * MIB
    rc, digest, count, err = lab.curl_sha256(["-o", "-", url("/bytes?n=%d" % n)])
    assert (rc, digest) == (0, body_sha256(n)), err
    assert handle.log().count("the body was streamed: a change of its content is ignored") == 1


# -- failures --------------------------------------------------------------------------------------

def test_hook_exception_is_logged_and_the_flow_goes_on(lab, sluice, tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("def responseheaders(flow):\n    flow.response.headers['X-Before'] = '1'\n    raise ValueError('boom')\n")
    handle = start(sluice, str(script))
    status, headers, _ = curl(lab, url("/echo"))
    assert status == 200
    log = handle.log()
    assert "script hook boom.py:responseheaders failed" in log and "ValueError: boom" in log
    assert "Traceback" in log


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_stream_callable_raising_mid_body_never_looks_complete(lab, sluice, rawserver, tmp_path, version):
    script = tmp_path / "bad_stream.py"
    script.write_text("def modify(chunks):\n    for i, c in enumerate(chunks):\n        if i == 2:\n"
                      "            raise RuntimeError('midway')\n        yield c\n"
                      "def responseheaders(flow):\n    flow.response.stream = modify\n")
    handle = start(sluice, str(script))
    text_origin(rawserver, "chunked")
    head, rest, reply = get(lab, version)
    assert head.startswith(b"http/1.1 200")
    if version == b"1.1":
        assert not rest.endswith(b"0\r\n\r\n"), rest       # no last chunk: incomplete
    else:
        assert reply.recv_error is not None, reply        # close-delimited: a reset
    assert "midway" in handle.log()


def test_script_that_fails_to_import_stops_sluice_at_start(lab, tmp_path):
    script = tmp_path / "bad_import.py"
    script.write_text("import this_module_does_not_exist\n")
    proc = lab.gateway.run([sys.executable, "-m", "appliance", "run", "-s", str(script)],
                           capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert "%s:1: ModuleNotFoundError" % script in proc.stderr.decode()


def test_error_hook_sees_a_failed_flow(lab, sluice, tmp_path):
    script = tmp_path / "errors.py"
    script.write_text("def error(context, flow):\n    context.log('failed: %s' % flow.error.msg)\n")
    handle = start(sluice, str(script), dports=(81,))
    rc, out, err = lab.curl(["-sS", "-o", "/dev/null", "-w", "%{http_code}", url("/x", port=81)])
    assert out == b"502"
    assert "script errors.py: failed: cannot connect" in handle.log(), handle.log()[-2000:]

