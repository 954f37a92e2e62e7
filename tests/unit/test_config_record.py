"""Configuration of recording and the access log (record.*, access_log)."""

import subprocess
import sys

import pytest

from appliance import config
from appliance.errors import ConfigError


def test_defaults():
    cfg = config.load()
    record = cfg.record
    assert record.dir is None                       # recording is off by default
    assert (record.max_bytes, record.max_body_bytes, record.max_message_bytes) == (
        1 << 30, 1 << 20, 1 << 20)
    assert record.segment_bytes is None and record.segment_size == 64 << 20
    assert record.queue == 10000
    assert cfg.access_log == "text"


@pytest.mark.parametrize("max_bytes, segment", [
    pytest.param("1g", 64 << 20, id="capped-64m"),
    pytest.param("160m", 10 << 20, id="sixteenth"),
    pytest.param("256k", 64 << 10, id="floor-64k"),
    pytest.param("16k", 16 << 10, id="never-above-max"),
])
def test_segment_size_follows_max_bytes(max_bytes, segment):
    cfg = config.load(overrides=["record.max_bytes=%s" % max_bytes])
    assert cfg.record.segment_size == segment


def test_segment_bytes_above_max_bytes_is_refused_with_its_line():
    text = "record:\n  dir: /tmp/x\n  max_bytes: 10m\n  segment_bytes: 20m\n"
    with pytest.raises(ConfigError) as info:
        config.load("s.yaml", text=text)
    assert info.value.problems == [
        "s.yaml:4: record.segment_bytes: 20971520 is more than record.max_bytes (10485760)"]
    assert config.load(text=text.replace("20m", "10m")).record.segment_size == 10 << 20


@pytest.mark.parametrize("text, expected", [
    pytest.param("access_log: off\n", "off", id="yaml-off-is-false"),
    pytest.param("access_log: 'off'\n", "off", id="quoted-off"),
    pytest.param("access_log: json\n", "json", id="json"),
    pytest.param("access_log: text\n", "text", id="text"),
])
def test_access_log(text, expected):
    assert config.load(text=text).access_log == expected


@pytest.mark.parametrize("text, message", [
    pytest.param("access_log: on\n", "access_log: expected one of off, text, json, got True",
                 id="yaml-on"),
    pytest.param("access_log: xml\n", "access_log: expected one of off, text, json", id="xml"),
    pytest.param("record: {queue: 0}\n", "record.queue: 0 is out of range", id="queue-0"),
    pytest.param("record: {segment_bytes: 0}\n", "record.segment_bytes: must be more than 0",
                 id="segment-0"),
    pytest.param("record: {max_body_bytes: lots}\n", "record.max_body_bytes: expected a size",
                 id="body-size"),
])
def test_bad_values(text, message):
    with pytest.raises(ConfigError) as info:
        config.load("c.yaml", text=text)
    assert message in info.value.problems[0]


def test_check_refuses_a_segment_larger_than_the_store(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("record:\n  max_bytes: 1m\n  segment_bytes: 2m\n")
    out = subprocess.run([sys.executable, "-m", "appliance", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == "%s:3: record.segment_bytes: 2097152 is more than " \
                         "record.max_bytes (1048576)\n" % path
