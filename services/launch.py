"""Start `adpa serve` as a child process on a free loopback port, and stop it (tests, demos).

    with ServiceProcess(["--role", "reference", "--model", "runs/ref"]) as ref:
        TeacherClient(ref.endpoint).info()
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil

from adpa.v1 import scoring_pb2, scoring_pb2_grpc

logger = logging.getLogger(__name__)


# Between choosing a port and a server binding it, the port must not be taken. The kernel hands out
# 32768-60999 (Linux's ip_local_port_range) to every outgoing connection, and Ray's workers listen on
# 10002-19999: a port from between them is taken meanwhile only by another explicit bind (a server
# given a port chosen the same way, in another process): ServiceProcess then starts its own again.
_QUIET_PORTS = range(20000, 32768)
_RANDOM = random.SystemRandom()  # not the seeded module state: processes seeded alike would pick alike


def free_port() -> int:
    """A loopback TCP port free now, from a range nothing takes without asking for it by number."""
    for _ in range(64):
        port = _RANDOM.choice(_QUIET_PORTS)
        if _can_bind(port):
            return port
    with socket.socket() as sock:  # the range is full: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _can_bind(port: int, *, reuse_address: bool = False) -> bool:
    """Whether this loopback port can be bound now; with `reuse_address`, also when it is only in
    TIME_WAIT (as our servers bind it), so that False means another socket holds it."""
    with socket.socket() as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ServiceProcess:
    """`adpa serve ARGS --port P --http-port H` in a child process; ready once it listens on both
    ports and ModelInfo answers."""

    def __init__(
        self,
        args: list[str],
        *,
        http: bool = True,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        port: int | None = None,
        http_port: int | None = None,
    ):
        self.serve_args = args
        self._given = (port, http_port if http else 0)  # e.g. restarting a service where its clients look
        self._choose_ports()
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _choose_ports(self) -> None:
        self.port, self.http_port = (given if given is not None else free_port() for given in self._given)

    @property
    def args(self) -> list[str]:
        return [*self.serve_args, "--port", str(self.port), "--http-port", str(self.http_port)]

    @property
    def endpoint(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        """Launch and wait until it answers."""
        return self.launch().wait_ready()

    def launch(self) -> ServiceProcess:
        """Start the process and return at once (it loads while the caller does other work)."""
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adpa.cli", "serve", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self._launched = time.monotonic()
        return self

    def wait_ready(self) -> ServiceProcess:
        """Block until ModelInfo answers (stopping the process if it exits or times out first).

        A port chosen here can be bound by another process before the server binds it: the server
        then exits at once, naming the port, and is started again on other ports (twice at most)."""
        retries = 2
        while True:
            try:
                self._wait_ready()
                return self
            except BaseException:
                exited = self.proc.poll() is not None
                self.stop()
                lost = [port for port, given in zip((self.port, self.http_port), self._given)
                        if given is None and not _can_bind(port, reuse_address=True)] if exited else []
                if not (lost and retries):
                    raise
            retries -= 1
            logger.warning("port %s was taken before `adpa serve` bound it: starting it on other ports", lost[0])
            self._choose_ports()
            self.launch()

    def _wait_ready(self) -> None:
        deadline = self._launched + self.startup_timeout_s
        # gRPC backs off between connection attempts (seconds, after a few refused ones): poll a port
        # that is about to open with short backoffs, or readiness is seen seconds late.
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 250)]
        with grpc.insecure_channel(f"127.0.0.1:{self.port}", options=options) as channel:
            stub = scoring_pb2_grpc.ScorerStub(channel)
            token = self.env.get("ADPA_AUTH_TOKEN")
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            while True:
                self._check_alive()
                try:
                    stub.ModelInfo(scoring_pb2.ModelInfoRequest(), timeout=1.0, metadata=metadata)
                    if self._listens_on(self.port):  # the answer is not another server's, on a port it took first
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service on port {self.port} not ready after {self.startup_timeout_s}s")
                time.sleep(0.1)
        # The HTTP side (health, metrics) starts just after gRPC: ready means both listen.
        while self.http_port and not self._listens_on(self.http_port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"HTTP port {self.http_port} not open after {self.startup_timeout_s}s")
            time.sleep(0.05)

    def _listens_on(self, port: int) -> bool:
        try:
            sockets = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:  # it has just exited
            return False
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == port for s in sockets)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"`adpa serve {' '.join(self.args)}` exited with code {self.proc.returncode}"
                               + (f"; see {self.log_path}" if self.log_path else ""))

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it has not exited within `timeout_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
