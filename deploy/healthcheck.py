"""Container health check of `adpa serve` (the images' HEALTHCHECK, docker-compose.yml's healthchecks).

    python /opt/adpa/healthcheck.py        # exit 0: ready; exit 1: not (yet) ready, with the reason

Asks HTTP `/readyz` on this container's own HTTP port (ADPA_HTTP_PORT, 8080 by default): 200 once the
models are loaded, a remote reference answers and the server is not draining. On Ray Serve (`adpa
serve --ray`) the same route is served by Serve's HTTP proxy on that port. With the HTTP side off
(ADPA_HTTP_PORT=0) it asks gRPC health (grpc.health.v1) for adpa.v1.Scorer on ADPA_PORT instead; that
needs plaintext gRPC, so with TLS keep the HTTP port on. Both probes need no token.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")
SERVICE = "adpa.v1.Scorer"


def local_host() -> str:
    """Where this container's server listens: its bind address, or loopback when it binds them all."""
    host = os.environ.get("ADPA_HOST", "127.0.0.1")
    return "127.0.0.1" if host in ANY_ADDRESS else host


def check_http(host: str, port: int, timeout: float) -> tuple[bool, str]:
    url = f"http://{host}:{port}/readyz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
    try:
        with opener.open(url, timeout=timeout) as answer:
            return answer.status == 200, f"{url}: {answer.status} {answer.read().decode(errors='replace')}"
    except urllib.error.HTTPError as err:  # 503 while loading, draining or without its reference
        return False, f"{url}: {err.code} {err.read().decode(errors='replace')}"
    except OSError as err:  # not listening yet, timeout
        return False, f"{url}: {err}"


def check_grpc(host: str, port: int, timeout: float) -> tuple[bool, str]:
    if os.environ.get("ADPA_TLS_CERT"):
        return False, "ADPA_HTTP_PORT=0 with TLS: the health check needs the HTTP port (set ADPA_HTTP_PORT)"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
    except grpc.RpcError as err:
        return False, f"grpc health {target} {SERVICE}: {err.code().name} {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, f"grpc health {target} {SERVICE}: {status}"


def main() -> int:
    try:
        http_port = int(os.environ.get("ADPA_HTTP_PORT", "8080"))
        grpc_port = int(os.environ.get("ADPA_PORT", "50051"))
        timeout = float(os.environ.get("ADPA_HEALTHCHECK_TIMEOUT_S", "4"))
    except ValueError as err:
        print(f"healthcheck: bad setting: {err}", file=sys.stderr)
        return 1
    host = local_host()
    ok, message = check_http(host, http_port, timeout) if http_port else check_grpc(host, grpc_port, timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
