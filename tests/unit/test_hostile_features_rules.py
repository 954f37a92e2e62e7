"""Hostile tests of rule and config loading without a network: bad rule files in rules_dir
and rules that `sluice check` accepts but the proxy cannot apply.  Each test is named after
the fault it proves (or the attack it survives) and asserts the correct outcome."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import policy
from appliance.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def laughs(depth):
    """A YAML "billion laughs": each level an alias list of nine of the previous one."""
    names = "abcdefghij"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, depth):
        lines.append("%s: &%s [%s]" % (names[i], names[i], ",".join(["*" + names[i - 1]] * 9)))
    lines.append("rules: [{match: {host: *%s}, stream: true}]" % names[depth - 1])
    return "\n".join(lines) + "\n"


def _config(tmp_path, files):
    rules = tmp_path / "rules.d"
    rules.mkdir()
    for name, data in files.items():
        (rules / name).write_bytes(data)
    config = tmp_path / "sluice.yaml"
    config.write_text("rules_dir: %s\n" % rules)
    return config, rules


def test_rule_file_that_is_not_utf8_is_a_traceback(tmp_path):
    # A rule file saved as UTF-16 or Latin-1 (an editor's choice): read_yaml catches only
    # OSError, so UnicodeDecodeError escapes: `sluice check` and `sluice run` die with a
    # traceback instead of FILE: message, and a SIGHUP reload raises in its greenlet (no
    # "reload failed" line).
    config, rules = _config(tmp_path, {"a.yaml": b"\xff\xfe- {match: {port: 22}, passthrough: true}\n",
                                       "b.yaml": b"- {name: caf\xe9, match: {port: 23}, passthrough: true}\n"})
    with pytest.raises(ConfigError) as info:
        policy.load(str(config))
    text = "\n".join(info.value.problems)
    assert str(rules / "a.yaml") in text and str(rules / "b.yaml") in text, text


def test_yaml_alias_bomb_in_a_rule_file_takes_seconds_and_gigabytes(tmp_path):
    # 800 bytes of YAML aliases ("billion laughs", 9^7 leaves here).  yaml.safe_load keeps
    # aliases as shared references, but read_yaml's line-tracking walk expands every alias
    # into new objects and records a line for every path: 6 s and 240 MB for depth 6, and
    # minutes and gigabytes for depth 7.  A reload runs it on the event loop: the proxy
    # stops meanwhile.  It must be refused (or bounded) at once.
    config, _ = _config(tmp_path, {"z.yaml": laughs(7).encode()})
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "appliance", "check", "-c", str(config)],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail("sluice check still parsing an 800-byte rule file after 3 s")
    assert time.monotonic() - t0 < 3 and done.returncode == 2, done.stderr[-1000:]


def test_replace_template_is_not_checked(tmp_path):
    # `to` of a regex replace is an re.sub template; `sluice check` compiles only `from`, so
    # "\1" without a group (or "\g<name>", "\q") passes the check and raises per request.
    config = tmp_path / "sluice.yaml"
    config.write_text('rules:\n  - match: {path: "/*"}\n    replace: [{from: "foo", to: "\\\\1", regex: true}]\n')
    with pytest.raises(ConfigError) as info:
        policy.load(str(config))
    assert "%s:3" % config in "\n".join(info.value.problems), info.value.problems


@pytest.mark.parametrize("name", ["empty.yaml", "dir.yaml", "loop.yaml"])
def test_odd_entries_in_rules_dir(tmp_path, name):
    # Passing guard: an empty file is no rules; a directory or a symlink loop named *.yaml
    # is a FILE: message, never a traceback.
    rules = tmp_path / "rules.d"
    rules.mkdir()
    if name == "empty.yaml":
        (rules / name).write_text("")
    elif name == "dir.yaml":
        (rules / name).mkdir()
    else:
        (rules / name).symlink_to(rules / name)
    config = tmp_path / "sluice.yaml"
    config.write_text("rules_dir: %s\n" % rules)
    if name == "empty.yaml":
        assert policy.load(str(config)).rules.rules == ()
        return
    with pytest.raises(ConfigError) as info:
        policy.load(str(config))
    assert str(rules / name) in "\n".join(info.value.problems)


def test_rules_test_prints_a_block_that_the_proxy_does_not_apply(tmp_path):
    # `sluice rules test` must say what Sluice would do.  With a respond rule listed before a
    # passthrough rule that also matches, it prints both actions at the request stage
    # ("respond 403 by block", "passthrough True by rest") while the proxy passes the
    # request through unblocked (see test_respond_rule_listed_first_loses_to_a_later_
    # passthrough_rule in tests/integration/test_hostile_features.py).  The output must
    # name one outcome for the request stage, the one the proxy applies.
    config = tmp_path / "sluice.yaml"
    config.write_text('rules:\n'
                      '  - {name: block, match: {host: ads.example}, respond: {status: 403, body: "no"}}\n'
                      '  - {name: rest, match: {host: "*"}, passthrough: true}\n')
    done = subprocess.run([sys.executable, "-m", "appliance", "rules", "test", "-c", str(config),
                           "http://ads.example/"], cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    request_stage = done.stdout.partition("request:")[2].partition("(give")[0]
    acting = [line.split()[0] for line in request_stage.splitlines() if line.strip()]
    assert not ({"respond", "passthrough"} <= set(acting)), done.stdout
