"""`make install` / `make uninstall` into a scratch root (DESTDIR): the tree it stages, a
venv that runs from it and names no scratch path, an edited config that a second install
keeps, and an uninstall that removes everything it added except that config.

Not root-only, but it installs the dependencies from the package registry with pip, and a
full install takes tens of seconds: it lives with the integration tests.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every file install stages (the venv's own files aside), relative to DESTDIR.
FILES = {
    "etc/sluice/sluice.yaml": ROOT / "etc" / "sluice.yaml",
    "usr/local/lib/systemd/system/sluice.service": ROOT / "systemd" / "sluice.service",
    "opt/sluice/share/sluice/sluice.yaml.installed": ROOT / "etc" / "sluice.yaml",
    "opt/sluice/share/sluice/iptables/sluice.rules.v4": ROOT / "iptables" / "sluice.rules.v4",
    "opt/sluice/share/sluice/iptables/sluice.rules.v6": ROOT / "iptables" / "sluice.rules.v6",
    "opt/sluice/share/sluice/systemd/tproxy.conf": ROOT / "systemd" / "tproxy.conf",
    "opt/sluice/share/doc/sluice/README.md": ROOT / "README.md",
}


def make(target, destdir):
    out = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", target,
                          "DESTDIR=%s" % destdir], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, "make %s: exit %d\n%s\n%s" % (target, out.returncode,
                                                            out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout


def files(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def run_installed(destdir, *args):
    """The installed venv's python (its `sluice` script's shebang names /opt/sluice, where it
    will live), from a directory that holds no source tree: `-m appliance ARGS`, or `-c`."""
    argv = list(args) if args[0] == "-c" else ["-m", "appliance", *args]
    return subprocess.run([str(destdir / "opt/sluice/bin/python"), *argv],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PATH": os.environ["PATH"]})


def test_install_keeps_an_edited_config_and_uninstall_leaves_only_it(tmp_path):
    destdir = tmp_path / "root"
    out = make("install", destdir)
    assert "DESTDIR is set: the sluice user was not created" in out

    for rel, source in FILES.items():
        assert (destdir / rel).read_bytes() == source.read_bytes(), rel
    assert (destdir / "etc/sluice/rules.d").is_dir()
    assert (destdir / "var/lib/sluice").is_dir()
    assert oct((destdir / "var/lib/sluice").stat().st_mode & 0o777) == "0o750"
    assert os.readlink(destdir / "usr/local/bin/sluice") == "/opt/sluice/bin/sluice"
    assert (destdir / "opt/sluice/bin/sluice").read_text().splitlines()[0] == \
        "#!/opt/sluice/bin/python"
    # Nothing in the staged tree names the scratch root: it works once copied to /.
    grep = subprocess.run(["grep", "-rl", str(destdir), str(destdir)], capture_output=True,
                          text=True)
    assert grep.stdout == ""

    version = run_installed(destdir, "version")
    assert version.returncode == 0 and version.stdout.startswith("sluice "), version.stderr
    check = run_installed(destdir, "check", "-c", str(destdir / "etc/sluice/sluice.yaml"))
    assert check.returncode == 0, check.stderr
    found = run_installed(destdir, "-c", "import appliance, importlib.metadata as m;"
                          "print(appliance.__file__, m.version('sluice-appliance'))")
    path, dist_version = found.stdout.split()
    assert path.startswith(str(destdir / "opt/sluice/lib/")) and dist_version in version.stdout
    # The admin endpoint's live page ships as package data, with its dependencies.
    page = run_installed(destdir, "-c", "import os, prometheus_client, rich, appliance.admin as a;"
                         "print(a.PAGE, os.path.getsize(a.PAGE))")
    assert page.returncode == 0, page.stderr
    page_path, page_size = page.stdout.split()
    assert page_path.startswith(str(destdir / "opt/sluice/lib/")) and int(page_size) > 1000

    # The operator edits the config and adds a rule file; a second install keeps the config
    # (the new default goes beside it), uninstall keeps both and removes the rest.
    (destdir / "etc/sluice/rules.d/local.yaml").write_text("rules: []\n")
    config = destdir / "etc/sluice/sluice.yaml"
    edited = config.read_text().replace("log_level: info", "log_level: warning")
    config.write_text(edited)
    out = make("install", destdir)
    assert "kept your edited /etc/sluice/sluice.yaml" in out
    assert config.read_text() == edited
    assert (destdir / "etc/sluice/sluice.yaml.new").read_bytes() == FILES[
        "etc/sluice/sluice.yaml"].read_bytes()

    out = make("uninstall", destdir)
    assert "kept your edited /etc/sluice/sluice.yaml" in out
    assert "kept /etc/sluice/rules.d: it is not empty" in out
    # sluice.yaml.new was the shipped default, unedited: it went with the rest.
    assert files(destdir) == {"etc/sluice/sluice.yaml", "etc/sluice/rules.d/local.yaml"}
    assert config.read_text() == edited
    assert not (destdir / "opt/sluice").exists() and not (destdir / "var/lib/sluice").exists()


@pytest.mark.parametrize("target", ["install", "uninstall"])
def test_refused_without_root_or_destdir(target):
    if os.geteuid() == 0:
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "make", "-C", str(ROOT), "--no-print-directory", target],
                             capture_output=True, text=True, timeout=60)
    else:
        out = subprocess.run(["make", "-C", str(ROOT), target], capture_output=True, text=True)
    assert out.returncode != 0 and "run it as root" in out.stdout
