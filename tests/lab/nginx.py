"""A private nginx serving static files in a lab namespace, and the files it serves.

`Nginx` writes its own nginx.conf in a temporary directory that also holds its pid file, logs
and temp paths; it never reads or writes /etc/nginx or /var/log/nginx.  It runs in the
foreground (`daemon off`) so the lab stops it by the pid it started.  `make_file` writes the
same deterministic bytes as the test origin's bodies (`tests.lab.origin.body`), so a file's
hash is `body_sha256(size)` as well.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .netns import LabError, Namespace, stop_process
from .origin import BLOCK, block

CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {access_log};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    types {{ text/html html; text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen {port} backlog=4096;
        listen [::]:{port} ipv6only=on backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


def make_file(path: str | Path, size: int) -> str:
    """Write `size` deterministic bytes (the body stream of tests.lab.origin) to `path`, in
    1 MiB writes, hashing as it goes; returns the sha256 hex.  About 1 s per GiB."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(-(-size // BLOCK)):
            data = block(i)
            if (i + 1) * BLOCK > size:
                data = data[:size - i * BLOCK]
            digest.update(data)
            f.write(data)
    return digest.hexdigest()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()]
    except OSError:
        return []


class Nginx:
    """nginx in namespace `ns`, serving `root_dir` on `port` (IPv4 and IPv6)."""

    def __init__(self, ns: Namespace, root_dir: str | Path, port: int = 80, workers: int = 1,
                 access_log: bool = True, worker_connections: int = 10000):
        self.ns, self.root_dir, self.port = ns, Path(root_dir), port
        self.workers, self.access_log = workers, access_log
        self.worker_connections = worker_connections
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Nginx:
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-nginx-"))
        conf = self.dir / "nginx.conf"
        conf.write_text(CONF.format(
            d=self.dir, port=self.port, root=self.root_dir.resolve(), workers=self.workers,
            worker_connections=self.worker_connections, nofile=max(20000, self.worker_connections * 2),
            access_log=(self.dir / "access.log") if self.access_log else "off"))
        with open(self.dir / "stderr.log", "wb") as err:
            # -e: errors before the config is read go to our file, not /var/log/nginx.
            self.proc = self.ns.popen(["nginx", "-p", str(self.dir), "-c", str(conf),
                                       "-e", str(self.dir / "error.log")],
                                      stdout=subprocess.DEVNULL, stderr=err)
        self.ns.on_teardown(self.stop)
        try:
            self.ns.wait_listening(self.port, timeout, self.proc)
        except LabError as exc:
            errors = self.error_log()
            self.stop()
            raise LabError("nginx did not start: %s\n%s" % (exc, errors)) from None
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGQUIT (graceful), then SIGKILL if it lingers; the namespace teardown reaps any
        orphaned worker.  Removes the private directory.  Idempotent."""
        code = None
        if self.proc is not None:
            workers = _children(self.proc.pid)
            code = stop_process(self.proc, signal.SIGQUIT, timeout)
            for pid in workers:  # only left if the master had to be killed
                try:
                    if Path("/proc/%d/comm" % pid).read_text().startswith("nginx"):
                        os.kill(pid, signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return code

    def error_log(self) -> str:
        if self.dir is None:
            return ""
        return "".join(p.read_text(errors="replace") for p in (self.dir / "stderr.log", self.dir / "error.log")
                       if p.exists())

    def access_lines(self) -> list[str]:
        path = self.dir / "access.log" if self.dir else None
        return path.read_text(errors="replace").splitlines() if path and path.exists() else []
