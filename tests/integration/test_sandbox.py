"""Sluice serves under the restrictions systemd/sluice.service puts on it, as far as they can
be had without systemd: NoNewPrivileges, a capability bounding set of CAP_NET_BIND_SERVICE
alone (it binds port 80 with it, and could not without it), and MemoryDenyWriteExecute
(the kernel's PR_SET_MDWE, the same refusal of writable-executable memory; gevent, greenlet
and ctypes must live with it).  SystemCallFilter and the file system namespacing need
systemd itself and are not tried here."""

from __future__ import annotations

import signal
import subprocess
import sys

import yaml

from tests.lab.netns import ORIGIN_PORT, stop_process

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
    assert "-> 200" in log and "Traceback" not in log and " ERROR " not in log, log
