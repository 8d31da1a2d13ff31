"""Start `adpa serve` as a child process on a free loopback port, and stop it (tests, demos).

    with ServiceProcess(["--role", "reference", "--model", "runs/ref"]) as ref:
        TeacherClient(ref.endpoint).info()
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from adpa.v1 import scoring_pb2, scoring_pb2_grpc


# Between choosing a port and a server binding it, the port must not be taken. The kernel hands out
# 32768-60999 (Linux's ip_local_port_range) to every outgoing connection, and Ray's workers listen on
# 10002-19999: a port from between them is taken meanwhile only by another explicit bind.
_QUIET_PORTS = range(20000, 32768)
_RANDOM = random.SystemRandom()  # not the seeded module state: processes seeded alike would pick alike


def free_port() -> int:
    """A loopback TCP port free now, from a range nothing takes without asking for it by number."""
    for _ in range(64):
        port = _RANDOM.choice(_QUIET_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the range is full: any port the kernel gives
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """`adpa serve ARGS --port P --http-port H` in a child process; ready once ModelInfo answers."""

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
        self.port = port or free_port()  # a given port: e.g. restarting a service where its clients look
        self.http_port = (http_port or free_port()) if http else 0
        self.args = [*args, "--port", str(self.port), "--http-port", str(self.http_port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

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
        """Block until ModelInfo answers (stopping the process if it exits or times out first)."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"service on port {self.port} not ready after {self.startup_timeout_s}s")
                    time.sleep(0.1)
        # The HTTP side (health, metrics) starts just after gRPC: ready means both answer.
        while self.http_port:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.http_port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"HTTP port {self.http_port} not open after {self.startup_timeout_s}s") from None
                time.sleep(0.05)

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
