"""Real services for tests: a redis-server on a free port, free ports, waiting for a port, the
Procfile's commands and a process's memory."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]


def procfile() -> dict[str, str]:
    """The Procfile's processes: name → command line."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory field in MiB: VmRSS (now) or VmHWM (peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class RedisServer:
    """A private redis-server (never the machine's shared one), stoppable and restartable."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False,
                 user: str = "", password: str = "", appendfsync: str = "always") -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed: run scripts/system-deps")
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.user, self.password = user, password  # an ACL user; the default user is then off
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", self.appendfsync,
             "--dir", str(self.workdir), "--maxmemory-policy", "noeviction",
             *(["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
                "--user", "default", "off"] if self.user else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url)
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def crash(self) -> None:
        """SIGKILL: no shutdown save, no final fsync; what survives is what the AOF held."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class ServiceProcess:
    """A project process (`python -m ...`) run as the Procfile runs it: its own environment,
    its output in a log file the test can read (and scan for patient data)."""

    #: Every log written during the session; tests/conftest.py scans them all at the end.
    all_logs: list[Path] = []

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path,
                 python: bool = True) -> None:
        self.args = args
        self.python = python  # args follow the interpreter; else args are the whole argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        ServiceProcess.all_logs.append(log_path)

    def start(self, wait_port: int | None = None, timeout: float = 60.0) -> "ServiceProcess":
        import os
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("ICH_")} | self.env
        self._log = open(self.log_path, "ab")
        argv = [sys.executable, *self.args] if self.python else self.args
        self.proc = subprocess.Popen(argv, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_port:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.args} exited {self.proc.returncode}:\n{self.log()}")
                try:
                    wait_for_port(wait_port, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        return self

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class WebhookReceiver:
    """A real HTTP consumer: records every POST and answers `respond(body)` (default 200)."""

    def __init__(self, respond=None, port: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        self.respond = respond or (lambda body: 200)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    status = receiver.respond(body)
                    receiver.requests.append({"headers": dict(self.headers), "body": body,
                                              "status": status, "at": time.time()})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> list[dict]:
        """Bodies (parsed) of the requests answered 2xx."""
        import json

        with self._lock:
            return [json.loads(r["body"]) for r in self.requests if 200 <= r["status"] < 300]

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"webhook condition not met; got {len(self.requests)} requests")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def metrics_text(port: int) -> dict[str, float]:
    """A /metrics endpoint as {'name{labels}': value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def histogram_quantile(metrics: dict[str, float], name: str, q: float) -> float:
    """Upper bucket bound holding quantile `q` of a Prometheus histogram (as PromQL would
    bracket it): coarse, but read from the process's own metrics."""
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v) for k, v in metrics.items()
                     if k.startswith(f"{name}_bucket") and "+Inf" not in k)
    total = metrics[f"{name}_count"]
    return next((bound for bound, count in buckets if count >= q * total), float("inf"))
