"""The rule language: every match key, every action, stages, first-match-per-kind, and the
errors `sluice check` reports with FILE:LINE."""

import textwrap

import pytest

from appliance import policy as policy_mod
from appliance.errors import ConfigError
from appliance.rules import Facts, RuleSet, compile_rules

WEB = dict(client="192.168.1.50", dest="203.0.113.7", port=80, host="a.cdn.example",
           path="/video/x.mp4", method="get")


def facts(**kw):
    values = dict(WEB, **kw)
    return Facts(values["client"], values["dest"], values["port"], values.get("host"),
                 values.get("path"), values.get("method"), values.get("content_type"))


def ruleset(*rules):
    return RuleSet(compile_rules(list(rules)))


MATCHES = [
    pytest.param({"host": "*.cdn.example"}, {}, True, id="host-glob"),
    pytest.param({"host": "*.CDN.example"}, {}, True, id="host-case-insensitive"),
    pytest.param({"host": "cdn.example"}, {}, False, id="host-no-match"),
    pytest.param({"host": ["x.org", "a.cdn.*"]}, {}, True, id="host-list"),
    pytest.param({"dest": "203.0.113.0/24"}, {}, True, id="dest-cidr"),
    pytest.param({"dest": ["10.0.0.0/8", "203.0.113.7"]}, {}, True, id="dest-list-and-address"),
    pytest.param({"dest": "2001:db8::/32"}, {}, False, id="dest-other-family"),
    pytest.param({"client": "192.168.1.50/32"}, {}, True, id="client-cidr"),
    pytest.param({"client": "192.168.2.0/24"}, {}, False, id="client-no-match"),
    pytest.param({"port": 80}, {}, True, id="port-int"),
    pytest.param({"port": "8000-8100"}, {"port": 8080}, True, id="port-range"),
    pytest.param({"port": "80*"}, {"port": 8080}, True, id="port-glob"),
    pytest.param({"port": [22, 443]}, {}, False, id="port-list-no"),
    pytest.param({"path": "/video/*"}, {}, True, id="path-glob"),
    pytest.param({"path": "/VIDEO/*"}, {}, False, id="path-case-sensitive"),
    pytest.param({"method": "GET"}, {}, True, id="method"),
    pytest.param({"method": ["POST", "PUT"]}, {}, False, id="method-list"),
    pytest.param({"content_type": "video/*"}, {"content_type": "video/mp4"}, True, id="content-type"),
    pytest.param({"content_type": "text/html"}, {"content_type": None}, False, id="content-type-unknown"),
    pytest.param({"host": "*.cdn.example", "port": 443}, {}, False, id="all-keys-must-match"),
    pytest.param({}, {}, True, id="no-match-key-matches-all"),
]


@pytest.mark.parametrize("match, changes, expected", MATCHES)
def test_match_keys(match, changes, expected):
    rules = ruleset({"match": match, "record": False})
    assert rules.rules[0].matches(facts(**changes)) is expected


def test_stage_of_a_rule_follows_its_keys():
    accept, request, response = compile_rules([
        {"match": {"client": "10.0.0.0/8", "port": 22}, "passthrough": True},
        {"match": {"host": "x", "port": 80}, "passthrough": True},
        {"match": {"host": "x", "content_type": "text/*"}, "record": False}])
    assert (accept.stage, request.stage, response.stage) == ("accept", "request", "response")


def test_accept_stage_sees_only_rules_decidable_without_a_byte():
    rules = ruleset({"match": {"host": "*"}, "passthrough": False},
                    {"match": {"port": 22}, "passthrough": True})
    accept = rules.decide("accept", Facts("192.168.1.5", "10.1.1.1", 22))
    assert accept.get("passthrough") is True and accept.rule("passthrough") == "rule 2"


def test_first_matching_rule_per_kind_decides():
    rules = ruleset(
        {"name": "a", "match": {"host": "*.cdn.example"}, "set_headers": {"X-A": "1"}},
        {"name": "b", "match": {"host": "*"}, "set_headers": {"X-B": "1"}, "stream": True},
        {"name": "c", "match": {"path": "/video/*"}, "stream": False, "record": False})
    request = rules.decide("request", facts())
    assert request.get(("set_headers", "request")) is None      # direction defaults to response
    response = rules.decide("response", facts(content_type="video/mp4"))
    assert response.get(("set_headers", "response")) == ((b"X-A", b"1"),)
    assert response.rule(("set_headers", "response")) == "a"
    assert response.get("response_stream") is True and response.rule("response_stream") == "b"
    assert response.get("record") is False and response.rule("record") == "c"
    assert response.names() == ["a", "b", "c"]


def test_per_direction_stream_and_size_thresholds():
    rules = ruleset({"match": {}, "request_stream": "2m", "response_stream": False})
    assert rules.decide("request", facts()).get("request_stream") == 2 << 20
    assert rules.decide("response", facts()).get("response_stream") is False


def test_direction_both_and_per_item_direction():
    rules = ruleset({"match": {}, "direction": "both", "set_headers": {"X": "1"},
                     "replace": [{"from": "a", "to": "b"}, {"from": "c", "to": "d",
                                                            "direction": "request"}]})
    request, response = rules.decide("request", facts()), rules.decide("response", facts())
    assert request.get(("set_headers", "request")) == ((b"X", b"1"),)
    assert response.get(("set_headers", "response")) == ((b"X", b"1"),)
    assert request.get(("replace", "request")) == ((b"a", b"b", False), (b"c", b"d", False))
    assert response.get(("replace", "response")) == ((b"a", b"b", False),)


def test_respond_action():
    rules = ruleset({"match": {"host": "ads.example"}, "respond": {"status": 403, "body": "blocked\n",
                                                                   "headers": {"X-Why": "ads"}}})
    respond = rules.decide("request", facts(host="ads.example")).get("respond")
    assert (respond.status, respond.body, respond.headers) == (403, b"blocked\n", ((b"X-Why", b"ads"),))


def test_tls_stage_matches_host_and_never_path_rules():
    rules = ruleset({"match": {"host": "bank.example", "path": "/x"}, "respond": {"status": 403}},
                    {"match": {"host": "*.example"}, "passthrough": True})
    tls = rules.decide("tls", Facts("1.2.3.4", "5.6.7.8", 443, host="bank.example"))
    assert tls.get("respond") is None and tls.get("passthrough") is True


def test_ignore_hosts_is_passthrough_by_regex_on_host_and_port():
    rules = RuleSet([], ignore_hosts=[r"^example\.org:443$", r"^10\.0\."])
    assert rules.decide("tls", Facts("1.1.1.1", "9.9.9.9", 443, host="example.org")).get("passthrough")
    assert rules.decide("accept", Facts("1.1.1.1", "10.0.3.4", 22)).get("passthrough")
    assert not rules.decide("request", Facts("1.1.1.1", "9.9.9.9", 80, host="example.org"))


def test_empty_ruleset_decides_nothing_quickly():
    rules = RuleSet()
    assert rules.empty and not rules.decide("request", None)


# -- sluice check: every fault with FILE:LINE ---------------------------------------------------

BAD_RULES = [
    pytest.param("- match: {hots: x}\n  stream: true\n", ":3: rules.0.match.hots: unknown match key", id="unknown-match-key"),
    pytest.param("- match: {host: x}\n  strem: true\n", ":4: rules.0.strem: unknown key", id="unknown-action"),
    pytest.param("- match: {dest: 10.0.0.300/8}\n  stream: true\n", "not an address or CIDR", id="bad-cidr"),
    pytest.param("- match: {port: 70000}\n  stream: true\n", "out of range", id="bad-port"),
    pytest.param("- match: {host: x}\n  replace: [{from: '(', to: y, regex: true}]\n", "regex does not compile", id="bad-regex"),
    pytest.param("- match: {host: x}\n  set_headers: {X-A: \"a\\r\\nb\"}\n", "CR, LF", id="crlf-in-header"),
    pytest.param("- match: {host: x}\n  stream: yes please\n", "expected a size", id="stream-wrong-type"),
    pytest.param("- match: {host: x}\n  passthrough: 1\n", "expected true or false", id="passthrough-wrong-type"),
    pytest.param("- match: {host: x}\n", "no action", id="no-action"),
    pytest.param("- match: {content_type: text/html}\n  passthrough: true\n", "could never apply", id="content-type-passthrough"),
    pytest.param("- match: {content_type: text/html}\n  set_headers: {X: y}\n  direction: request\n", "could never apply", id="content-type-request-header"),
    pytest.param("- match: {host: x}\n  respond: {status: 99}\n", "status 200-599", id="respond-status"),
    pytest.param("- match: {host: x}\n  direction: up\n  set_headers: {X: y}\n", "request, response or both", id="bad-direction"),
    pytest.param("- match: {host: []}\n  stream: true\n", "matches nothing", id="empty-list"),
]


@pytest.mark.parametrize("text, message", BAD_RULES)
def test_bad_rule_in_the_config_is_reported_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "sluice.yaml"
    path.write_text("log_level: info\nrules:\n" + textwrap.indent(text, "  "))
    with pytest.raises(ConfigError) as exc:
        policy_mod.load(str(path))
    [problem] = exc.value.problems
    assert problem.startswith(str(path) + ":"), problem
    assert message in problem, problem


def test_bad_rule_in_rules_dir_names_its_file_and_line(tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "10-ok.yaml").write_text("- name: ok\n  match: {host: a}\n  record: false\n")
    (rules_dir / "20-bad.yaml").write_text("# comment\n- name: bad\n  match:\n    host: a\n    port: nope\n  stream: true\n")
    config = tmp_path / "sluice.yaml"
    config.write_text("rules_dir: %s\n" % rules_dir)
    with pytest.raises(ConfigError) as exc:
        policy_mod.load(str(config))
    [problem] = exc.value.problems
    assert problem.startswith("%s:5: 0.match.port" % (rules_dir / "20-bad.yaml")), problem


def test_rules_dir_files_load_in_name_order_after_inline_rules(tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "b.yaml").write_text("rules:\n  - {name: from-b, match: {host: x}, record: false}\n")
    (rules_dir / "a.yaml").write_text("- {name: from-a, match: {host: x}, record: false}\n")
    config = tmp_path / "sluice.yaml"
    config.write_text("rules_dir: %s\nrules:\n  - {name: inline, match: {host: y}, record: false}\n" % rules_dir)
    loaded = policy_mod.load(str(config))
    assert [r.name for r in loaded.rules.rules] == ["inline", "from-a", "from-b"]
    assert [p.rsplit("/", 1)[1] for p in loaded.rule_files] == ["a.yaml", "b.yaml"]


def test_script_that_fails_to_import_names_file_and_line(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import os\n\nx = 1 / 0\n")
    with pytest.raises(ConfigError) as exc:
        policy_mod.load(None, scripts=[str(script)])
    assert exc.value.problems == ["%s:3: ZeroDivisionError: division by zero" % script]


def test_script_with_a_syntax_error_names_file_and_line(tmp_path):
    script = tmp_path / "syntax.py"
    script.write_text("def responseheaders(flow):\n    flow.response.stream = = True\n")
    with pytest.raises(ConfigError) as exc:
        policy_mod.load(None, scripts=[str(script)])
    assert exc.value.problems[0].startswith("%s:2: SyntaxError" % script)


def test_policy_is_immutable():
    loaded = policy_mod.load(None)
    with pytest.raises(AttributeError):
        loaded.rules = None


# -- the shipped example and `sluice rules test` ------------------------------------------------

EXAMPLE = __import__("pathlib").Path(__file__).parents[2] / "examples" / "rules.yaml"


def _example_config(tmp_path):
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / "example.yaml").write_text(EXAMPLE.read_text())
    config = tmp_path / "sluice.yaml"
    config.write_text("rules_dir: %s\n" % rules_dir)
    return config


def test_example_rules_file_has_every_action_and_loads(tmp_path):
    loaded = policy_mod.load(str(_example_config(tmp_path)))
    kinds = set()
    for rule in loaded.rules.rules:
        kinds.update(k if isinstance(k, str) else k[0] for k in rule.actions)
    assert kinds == {"respond", "passthrough", "request_stream", "response_stream", "replace",
                     "set_headers", "remove_headers", "record"}


@pytest.mark.parametrize("args, expected", [
    (["http://ads.example/x"], ["respond", "403, 23 body bytes", "block-ads"]),
    (["http://a.cdn.example/video/1.mp4", "--content-type", "video/mp4"], ["response_stream", "True", "video"]),
    (["http://upload.example/u", "--method", "PUT", "--content-type", "text/plain"],
     ["request_stream", "524288", "uploads", "response_stream", "False"]),
    (["http://x.example/", "--client", "192.168.1.50", "--dest", "10.0.0.9"], ["set_headers (request)", "X-Lan: 1"]),
    (["http://ssh.example:22/", "--client", "192.168.1.50", "--dest", "10.0.0.9"], ["accept:", "passthrough", "lab-box-ssh"]),
])
def test_sluice_rules_test_prints_what_would_be_decided(tmp_path, capsys, args, expected):
    from appliance import cli
    code = cli.main(["rules", "test", "-c", str(_example_config(tmp_path)), *args])
    out = capsys.readouterr().out
    assert code == 0, out
    for text in expected:
        assert text in out, out
