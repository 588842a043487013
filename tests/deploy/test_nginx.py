"""deploy/nginx/prvng.conf: ``nginx -t`` passes with a self-signed certificate made here, and a
real nginx running the file (its ports and upstreams moved to loopback ports of this test, its
certificate and log paths to a temp dir) redirects HTTP to HTTPS, serves TLS, routes each
name to its service with the forwarded headers, streams Server-Sent Events unbuffered on every
SSE route, adds the security headers only where the application did not, and rate-limits
logins. The stand-in services are plain HTTP servers that send no ``X-Accel-Buffering``, so
unbuffered streaming is the configuration's doing."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.control_center.ui.security import SECURITY_HEADERS
from tests.conftest import free_port
from tests.deploy.artifacts import DEFAULT_PORTS, DEPLOY, run, show, tool

CONF = DEPLOY / "nginx" / "prvng.conf"
CERT, KEY = "/etc/prvng/tls/fullchain.pem", "/etc/prvng/tls/privkey.pem"
LOGS = "/var/log/nginx/"
CC, ORCH, KEEPER = "prvng.example.com", "orchestrator.prvng.example.com", "keeper.prvng.example.com"
UPSTREAMS = {
    "control-center": DEFAULT_PORTS["control-center"],
    "orchestrator": DEFAULT_PORTS["orchestrator"],
    "ops-keeper": DEFAULT_PORTS["ops-keeper"],
}
#: The SSE routes of the services: (name, path).
SSE_ROUTES = [(CC, "/ui/events"), (CC, "/system/events"), (ORCH, "/tasks/abc123/logs?follow=1")]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CC)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(CC),
                    x509.DNSName(ORCH),
                    x509.DNSName(KEEPER),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def install(folder: Path, text: str) -> Path:
    """``text`` (prvng.conf) with certificate and logs in ``folder``, included in a main
    configuration whose pid file and error log are there too; returns the main file."""
    cert, key = make_certificate(folder)
    for path in (CERT, KEY, LOGS):
        assert path in text, f"prvng.conf no longer mentions {path}: update this test"
    text = text.replace(CERT, str(cert)).replace(KEY, str(key)).replace(LOGS, f"{folder}/")
    (folder / "prvng.conf").write_text(text, "utf-8")
    main = folder / "nginx.conf"
    main.write_text(
        f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n    include {folder}/prvng.conf;\n}}\n",
        "utf-8",
    )
    return main


def nginx_argv(main: Path) -> list[str]:
    """nginx with everything it writes (pid, error log) in the folder of ``main``."""
    folder = main.parent
    return [tool("nginx"), "-p", str(folder), "-e", f"{folder}/error.log", "-c", str(main)]


def nginx_t(main: Path) -> subprocess.CompletedProcess[str]:
    return run([*nginx_argv(main), "-t"])


def problems(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """nginx's [emerg]/[warn] lines, but the deprecation of `listen … http2` (nginx >= 1.25)."""
    return [
        ln
        for ln in proc.stderr.splitlines()
        if ("[emerg]" in ln or "[warn]" in ln or "[alert]" in ln)
        and 'the "listen ... http2" directive is deprecated' not in ln
    ]


def test_nginx_t_accepts_the_configuration(tmp_path: Path) -> None:
    proc = nginx_t(install(tmp_path, CONF.read_text("utf-8")))
    assert proc.returncode == 0 and "test is successful" in proc.stderr, show(proc)
    assert not problems(proc), show(proc)


def test_nginx_t_refuses_a_broken_configuration(tmp_path: Path) -> None:
    text = CONF.read_text("utf-8").replace("proxy_buffering off;", "proxy_buffering of;", 1)
    proc = nginx_t(install(tmp_path, text))
    assert proc.returncode != 0 and "proxy_buffering" in proc.stderr, show(proc)


# ------------------------------------------------------------------ a running nginx


@dataclass
class Backend:
    """A stand-in service: answers JSON naming itself and the headers it got; the UI pages
    carry the UI's real security headers; SSE routes send one event, wait for ``release``,
    then a second one."""

    name: str
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    def start(self) -> int:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path.endswith("/events") or path.endswith("/logs"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"event: first\ndata: 1\n\n")
                    self.wfile.flush()
                    backend.release.wait(20)
                    self.wfile.write(b"event: second\ndata: 2\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                body = json.dumps(
                    {"service": backend.name, "path": self.path, "headers": dict(self.headers)}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if path.startswith("/ui/"):
                    for name, value in SECURITY_HEADERS.items():
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Proxy:
    http_port: int
    https_port: int
    cafile: Path
    backends: dict[str, Backend]

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.cafile))
        return httpx.Client(base_url=f"https://127.0.0.1:{self.https_port}", verify=ctx, timeout=10)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited {proc.returncode}: {log.read_text('utf-8')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on {port}: {log.read_text('utf-8')}")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    folder = tmp_path_factory.mktemp("nginx")
    backends = {name: Backend(name) for name in UPSTREAMS}
    ports = {name: b.start() for name, b in backends.items()}
    http_port, https_port = free_port(), free_port()
    text = CONF.read_text("utf-8")

    def move(old: str, new: str, count: int) -> None:
        nonlocal text
        assert text.count(old) == count, f"prvng.conf: {old!r} not {count}x: update this test"
        text = text.replace(old, new)

    move("listen 80;", f"listen 127.0.0.1:{http_port};", 1)
    move("listen [::]:80;", "", 1)
    move("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 3)
    move("listen [::]:443 ssl http2;", "", 3)
    for name, port in UPSTREAMS.items():
        move(f"server 127.0.0.1:{port};", f"server 127.0.0.1:{ports[name]};", 1)
    main = install(folder, text)
    proc = subprocess.Popen(
        [*nginx_argv(main), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # nginx logs to error.log in the folder
    )
    try:
        _wait_port(https_port, proc, folder / "error.log")
        yield Proxy(http_port, https_port, folder / "fullchain.pem", backends)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for b in backends.values():
            b.stop()


def test_plain_http_redirects_to_https_keeping_the_path(proxy: Proxy) -> None:
    for host in (CC, ORCH, KEEPER):
        r = httpx.get(
            f"http://127.0.0.1:{proxy.http_port}/ui/workflows?page=2",
            headers={"Host": host},
            follow_redirects=False,
        )
        assert r.status_code == 301
        assert r.headers["location"] == f"https://{host}/ui/workflows?page=2"


def test_each_name_reaches_its_service_over_verified_tls_with_forwarded_headers(
    proxy: Proxy,
) -> None:
    with proxy.client() as c:
        for host, service in (
            (CC, "control-center"),
            (ORCH, "orchestrator"),
            (KEEPER, "ops-keeper"),
        ):
            r = c.get("/health", headers={"Host": host})
            assert r.status_code == 200, r.text
            seen = r.json()
            assert seen["service"] == service
            got = {k.lower(): v for k, v in seen["headers"].items()}
            assert got["host"] == host
            assert got["x-forwarded-proto"] == "https"
            assert got["x-forwarded-for"] == "127.0.0.1"
            assert "server" not in r.headers or not re.search(r"\d", r.headers["server"])


def test_security_headers_are_added_to_the_apis_and_never_doubled_on_the_ui(
    proxy: Proxy,
) -> None:
    with proxy.client() as c:
        api = c.get("/health", headers={"Host": ORCH})
        assert api.headers.get_list("strict-transport-security") == [
            "max-age=63072000; includeSubDomains"
        ]
        assert api.headers.get_list("x-content-type-options") == ["nosniff"]
        assert api.headers.get_list("x-frame-options") == ["DENY"]
        assert api.headers.get_list("referrer-policy") == ["same-origin"]
        ui = c.get("/ui/login", headers={"Host": CC})
        for name, value in SECURITY_HEADERS.items():
            assert ui.headers.get_list(name) == [value], name


@pytest.mark.parametrize(("host", "path"), SSE_ROUTES)
def test_server_sent_events_reach_the_client_as_they_are_written(
    proxy: Proxy, host: str, path: str
) -> None:
    service = {CC: "control-center", ORCH: "orchestrator"}[host]
    backend = proxy.backends[service]
    backend.release.clear()
    received: list[str] = []
    with (
        proxy.client() as c,
        c.stream("GET", path, headers={"Host": host, "Accept": "text/event-stream"}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        started = time.monotonic()
        for line in lines:
            received.append(line)
            if line == "data: 1":
                break
        # The service still holds the stream open: a buffering proxy would sit on this event.
        assert received[-1:] == ["data: 1"] and time.monotonic() - started < 5
        assert not backend.release.is_set()
        backend.release.set()
        received.extend(lines)
    assert [ln for ln in received if ln.startswith("data:")] == ["data: 1", "data: 2"]


def test_login_floods_are_refused_with_429(proxy: Proxy) -> None:
    with proxy.client() as c:
        codes = [c.post("/auth/login", headers={"Host": CC}).status_code for _ in range(25)]
    assert codes[0] == 200
    assert 429 in codes
