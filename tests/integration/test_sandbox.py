"""Sluice serves under the restrictions systemd/sluice.service puts on it, as far as they can
be had without systemd: NoNewPrivileges, a capability bounding set of CAP_NET_BIND_SERVICE
alone (it binds port 80 with it, and could not without it), and MemoryDenyWriteExecute
(the kernel's PR_SET_MDWE, the same refusal of writable-executable memory; gevent, greenlet
and ctypes must live with it).  SystemCallFilter: every system call Sluice makes (strace -f,
`check`, then `run` with two workers, buffered and spliced bodies, a reload and a stop) is
one the unit's filter allows, as `systemd-analyze syscall-filter` expands it.  The file
system namespacing needs systemd itself and is not tried here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.lab.netns import ORIGIN_PORT, REPO_ROOT, stop_process

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
# Set MDWE on this process, then exec the rest of argv: the restriction survives exec.
MDWE_EXEC = ("import ctypes, os, sys\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "if libc.prctl(%d, %d, 0, 0, 0):\n"
             "    sys.exit('PR_SET_MDWE: errno %%d' %% ctypes.get_errno())\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n" % (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN))
PROBE = ("import mmap\n"
         "try:\n"
         "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
         "    print('wx allowed')\n"
         "except OSError:\n"
         "    print('wx refused')\n")


def sandboxed(argv, caps="net_bind_service"):
    return ["setpriv", "--no-new-privs", "--bounding-set=-all,+%s" % caps,
            sys.executable, "-c", MDWE_EXEC, sys.executable, *argv]


def test_the_sandbox_is_real(lab):
    """The wrapper does refuse W+X memory, and without the capability port 80 is refused."""
    out = lab.gateway.run(sandboxed(["-c", PROBE]), capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "wx refused", out.stderr
    bind = "import socket; s = socket.socket(socket.AF_INET6); s.bind(('::', 80)); print('bound')"
    out = lab.gateway.run(sandboxed(["-c", bind], caps="net_raw"), capture_output=True,
                          text=True, timeout=30)
    assert out.returncode != 0 and "Permission denied" in out.stderr


def test_sluice_serves_in_the_sandbox(lab, test_origin, tmp_path):
    config = tmp_path / "sluice.yaml"
    config.write_text(yaml.safe_dump({"listen": [{"host": "::", "port": 80, "mode": "transparent"}],
                                      "log_level": "info", "workers": 2}))
    stderr = tmp_path / "sluice.stderr"
    with open(stderr, "wb") as err:
        proc = lab.gateway.popen(sandboxed(["-m", "appliance", "run", "-c", str(config)]),
                                 stdout=subprocess.DEVNULL, stderr=err)
    lab.redirect(80, ORIGIN_PORT)
    try:
        lab.gateway.wait_listening(80, 10, proc)
        for n in (10, 5 << 20):   # buffered, then streamed (splice)
            rc, body, err = lab.curl(["http://%s:%d/bytes?n=%d" % (lab.origin_ip, ORIGIN_PORT, n)])
            assert rc == 0 and len(body) == n, err + stderr.read_text()
        assert stop_process(proc, signal.SIGTERM, 10) == 0
    finally:
        lab.redirect(80, ORIGIN_PORT, enabled=False)
        stop_process(proc, signal.SIGKILL)
    log = stderr.read_text()
    assert " 200 " in log and "Traceback" not in log and " ERROR " not in log, log


# -- SystemCallFilter ---------------------------------------------------------------------------

def unit_filter():
    """The unit's SystemCallFilter= lines: (allowed groups and names, denied ones)."""
    allow, deny = [], []
    for line in (REPO_ROOT / "systemd" / "sluice.service").read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.split("=", 1)[1]
            (deny if value.startswith("~") else allow).extend(value.lstrip("~").split())
    return allow, deny


def expand(names):
    """System call names behind filter groups, as `systemd-analyze syscall-filter` lists."""
    text = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                          text=True, check=True).stdout
    groups, current = {}, None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name.startswith("@"):
            todo.extend(groups[name])
        else:
            out.add(name)
    return out


def syscalls(summary):
    """The names in an `strace -c` table."""
    names = set()
    for line in summary.splitlines():
        words = line.split()
        if words and re.fullmatch(r"[0-9.]+", words[0]) and words[-1] != "total":
            names.add(words[-1])
    return names


def test_every_system_call_is_one_the_unit_allows(lab, test_origin, tmp_path):
    for tool in ("strace", "systemd-analyze"):
        assert shutil.which(tool), "%s is missing (make deps)" % tool
    allow, deny = unit_filter()
    allowed = expand(allow) - expand(deny)
    config = tmp_path / "sluice.yaml"
    config.write_text(yaml.safe_dump({"listen": [{"host": "::", "port": 8091,
                                                  "mode": "transparent"}],
                                      "log_level": "info", "workers": 2}))
    summary, used = tmp_path / "strace.txt", set()
    strace = ["strace", "-f", "-qq", "-c", "-o", str(summary)]
    check = lab.gateway.run(strace + [sys.executable, "-m", "appliance", "check", "-c",
                                      str(config)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stderr
    used |= syscalls(summary.read_text())
    with open(tmp_path / "sluice.stderr", "wb") as err:
        proc = lab.gateway.popen(strace + [sys.executable, "-m", "appliance", "run", "-c",
                                           str(config)], stdout=subprocess.DEVNULL, stderr=err)
    lab.redirect(8091, ORIGIN_PORT)
    try:
        lab.gateway.wait_listening(8091, 20)
        (sluice,) = Path("/proc/%d/task/%d/children" % (proc.pid, proc.pid)).read_text().split()
        for n in (10, 5 << 20, 20):
            rc, body, _ = lab.curl(["http://%s:%d/bytes?n=%d" % (lab.origin_ip, ORIGIN_PORT, n)])
            assert rc == 0 and len(body) == n
        os.kill(int(sluice), signal.SIGHUP)     # Sluice, strace's child (signals are ours)
        time.sleep(0.5)
        os.kill(int(sluice), signal.SIGTERM)
        assert proc.wait(20) == 0                # strace exits with its child's status
    finally:
        lab.redirect(8091, ORIGIN_PORT, enabled=False)
        stop_process(proc, signal.SIGKILL)
    used |= syscalls(summary.read_text())
    assert "splice" in used and "accept4" in used   # the run was seen
    assert used - allowed == set()
