"""The sluice command: exit codes and what it prints."""

import subprocess
import sys

import pytest

from appliance import __version__, cli


def sluice(*args):
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60)


def test_version():
    out = sluice("version")
    assert out.returncode == 0 and out.stdout.strip() == "sluice %s" % __version__


def test_check_ok_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("stream_large_bodies: 3m\n")
    assert sluice("check", "-c", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream_large_bodies: 3m\nworkers: -1\nnope: 2\n")
    out = sluice("check", "-c", str(bad))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "%s:2: workers: -1 is out of range (1..256)" % bad,
        "%s:3: nope: unknown option (known: %s)" % (bad, ", ".join(
            f for f in cli.config.Config.__dataclass_fields__)),
    ]
    assert "Traceback" not in out.stderr


def test_missing_file():
    out = sluice("check", "-c", "/nonexistent/sluice.yaml")
    assert out.returncode == 2 and "/nonexistent/sluice.yaml: cannot read" in out.stderr


@pytest.mark.parametrize("args,expected", [
    (["--stream", "3m"], "stream_large_bodies: 3145728"),
    (["--set", "stream_large_bodies=1.5m"], "stream_large_bodies: 1572864"),
])
def test_stream_alias(args, expected):
    out = sluice("config", *args)
    assert out.returncode == 0 and expected in out.stdout.splitlines()


def test_usage_error_exit_2():
    assert sluice("frobnicate").returncode == 2
