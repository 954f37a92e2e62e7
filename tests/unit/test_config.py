"""Config: sizes, durations, defaults, and errors that name file, line and key."""

import pytest

from appliance import config
from appliance.errors import ConfigError

SIZES = [
    pytest.param(0, 0, id="zero"),
    pytest.param(4096, 4096, id="int"),
    pytest.param("4096", 4096, id="digits"),
    pytest.param("3m", 3 * 1024 ** 2, id="3m"),
    pytest.param("3M", 3 * 1024 ** 2, id="3M"),
    pytest.param("1.5m", 1572864, id="1.5m"),
    pytest.param("512k", 512 * 1024, id="512k"),
    pytest.param("1g", 1024 ** 3, id="1g"),
    pytest.param("64KB", 64 * 1024, id="64KB"),
]
BAD_SIZES = [
    pytest.param(-1, id="negative-int"),
    pytest.param("-3m", id="negative-str"),
    pytest.param("3x", id="unit"),
    pytest.param("1.5", id="fraction-of-byte"),
    pytest.param(True, id="bool"),
    pytest.param("", id="empty"),
]
DURATIONS = [
    pytest.param("500ms", 0.5, id="ms"),
    pytest.param("10s", 10.0, id="s"),
    pytest.param("2m", 120.0, id="m"),
    pytest.param("1h", 3600.0, id="h"),
    pytest.param(5, 5.0, id="plain"),
]


@pytest.mark.parametrize("text,expected", SIZES)
def test_size(text, expected):
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_size(text):
    with pytest.raises(config._Invalid):
        config.parse_size(text)


@pytest.mark.parametrize("text,expected", DURATIONS)
def test_duration(text, expected):
    assert config.parse_duration(text) == expected


def test_defaults():
    cfg = config.load()
    assert cfg.limits.max_header_bytes == 64 * 1024
    assert cfg.limits.max_headers == 100
    assert cfg.body_size_limit == 64 * 1024 ** 2
    assert (cfg.timeouts.connect, cfg.timeouts.header, cfg.timeouts.idle,
            cfg.timeouts.drain) == (10, 30, 60, 30)
    assert [(l.host, l.port) for l in cfg.listen] == [("127.0.0.1", 8080)]


@pytest.mark.parametrize("name", ["stream_large_bodies", "body_size_limit",
                                  "limits.max_header_bytes", "record.max_bytes"])
def test_every_size_option_takes_the_same_syntax(name):
    cfg = config.load(overrides=["%s=1.5M" % name])
    section, _, key = name.rpartition(".")
    holder = getattr(cfg, section) if section else cfg
    assert getattr(holder, key) == 1572864


@pytest.mark.parametrize("name", ["connect", "header", "idle", "drain"])
def test_every_duration_option_takes_the_same_syntax(name):
    assert getattr(config.load(overrides=["timeouts.%s=750ms" % name]).timeouts, name) == 0.75


ERRORS = [
    pytest.param("bogus: 1\n", 1, "bogus", "unknown option", id="unknown-key"),
    pytest.param("timeouts:\n  idle: soon\n", 2, "timeouts.idle", "duration", id="bad-duration"),
    pytest.param("\n\nbody_size_limit: -5m\n", 3, "body_size_limit", "negative",
                 id="negative-size"),
    pytest.param("workers: many\n", 1, "workers", "whole number", id="wrong-type"),
    pytest.param("listen:\n  - host: '::'\n    port: 80\n    mode: nat\n", 4, "listen.0.mode",
                 "transparent", id="bad-mode"),
    pytest.param("limits: 5\n", 1, "limits", "mapping", id="section-not-mapping"),
    pytest.param("a: [\n", 2, "", "invalid YAML", id="yaml-syntax"),
    pytest.param("workers: 1\nworkers: 2\n", 2, "workers", "duplicate", id="duplicate-key"),
]


@pytest.mark.parametrize("text,line,key,words", ERRORS)
def test_errors_name_file_line_and_key(text, line, key, words):
    with pytest.raises(ConfigError) as info:
        config.load("sluice.yaml", text=text)
    problem = info.value.problems[0]
    assert problem.startswith("sluice.yaml:%d: " % line), problem
    assert key in problem and words in problem, problem


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config.load("c.yaml", text="workers: 0\nrelay: tcp\nbogus: 1\n")
    assert [p.split(":")[1] for p in info.value.problems] == ["1", "2", "3"]


def test_set_override_and_error():
    cfg = config.load(text="timeouts: {idle: 10s}\n", overrides=["timeouts.idle=2m",
                                                                  "stream_websockets=true"])
    assert cfg.timeouts.idle == 120 and cfg.stream_websockets is True
    with pytest.raises(ConfigError) as info:
        config.load(overrides=["limits.max_headers=lots"])
    assert info.value.problems[0].startswith("--set: limits.max_headers")


def test_stream_null_means_buffer_everything():
    assert config.load(text="stream_large_bodies: null\n").stream_large_bodies is None


def test_shipped_config_is_valid_and_documents_every_option():
    import pathlib
    import yaml
    path = pathlib.Path(__file__).parents[2] / "etc" / "sluice.yaml"
    config.load(str(path))
    tree = yaml.safe_load(path.read_text())

    def keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from keys(value, prefix + key + ".")
            else:
                yield prefix + key
    assert {name for name, _, _ in config.describe()} == set(keys(tree))
