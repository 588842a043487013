"""Network helpers for extensions: talk to what a task service serves, from the extension process.

A task service's ``check`` must prove that the service answers over the network at the server's
``address``, not only that a process exists. These helpers speak just enough of each protocol,
with the standard library only and a timeout on every socket::

    from provisioning.workspace.sdk_net import dns_query_a, http_get, resp_command

    resp_command("10.209.0.2", 6379, "PING")           # -> "PONG"
    http_get("10.209.0.2", 8080, "/")                   # -> HttpReply(status=200, body="...")
    dns_query_a("10.209.0.2", 53, "web-01.prvng.internal")  # -> DnsReply(rcode=0, addresses=[...])

They also hold what the built-in task services share: reading the ``port`` setting and the
server's address with clear failures (:func:`port_setting`, :func:`address_of`), the inventory of
the request's context (:func:`inventory`), and :data:`DAEMON_SH`, POSIX shell functions that find
and stop a daemon by its pid file on the server (run through ``Request.exec``).
"""

from __future__ import annotations

import http.client
import secrets
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from provisioning.workspace.sdk import Failure

__all__ = [
    "DAEMON_SH",
    "DnsReply",
    "HttpReply",
    "RespClient",
    "RespError",
    "RespValue",
    "address_of",
    "dns_query_a",
    "http_get",
    "info_fields",
    "inventory",
    "parse_kv",
    "port_open",
    "port_setting",
    "rcode_name",
    "resolves_to",
    "resp_command",
]

# ---------------------------------------------------------------------- settings and context


def port_setting(settings: Mapping[str, Any], default: int, key: str = "port") -> int:
    """``settings[key]`` as a TCP/UDP port (``default`` when absent).

    Raises:
        Failure: it is not an integer from 1 to 65535.
    """
    raw = settings.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise Failure(f"settings.{key} must be a port number from 1 to 65535, got {raw!r}")
    try:
        port = int(raw)
    except ValueError:
        raise Failure(
            f"settings.{key} must be a port number from 1 to 65535, got {raw!r}"
        ) from None
    if not 1 <= port <= 65535:
        raise Failure(f"settings.{key} must be a port number from 1 to 65535, got {port}")
    return port


def address_of(server: Mapping[str, Any]) -> str:
    """The server's address.

    Raises:
        Failure: it has none yet (the server was not created).
    """
    address = server.get("address")
    if not isinstance(address, str) or not address:
        name = server.get("hostname", "?")
        raise Failure(f"server {name} has no address: create it first (prvng server create)")
    return address


def inventory(context: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(hostname, address)`` of every server of ``context["inventory"]`` that has an address,
    in order and without duplicates (a missing inventory is empty)."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    entries = context.get("inventory") or []
    if not isinstance(entries, list):
        return out
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        host, addr = entry.get("hostname"), entry.get("address")
        if isinstance(host, str) and host and isinstance(addr, str) and addr and host not in seen:
            seen.add(host)
            out.append((host, addr))
    return out


# ---------------------------------------------------------------------- TCP


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------- RESP (Redis)


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-READONLY ...``) from a Redis server."""


RespValue = str | int | None | list["RespValue"] | RespError


class RespClient:
    """One connection to a Redis server speaking RESP2; use as a context manager.

    Raises (from every method): OSError when the connection fails or times out, RespError for an
    error reply (nested errors inside an array are returned as :class:`RespError` values).
    """

    def __init__(self, host: str, port: int, timeout_s: float = 3.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._file = self._sock.makefile("rb")

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def command(self, *args: str | int) -> RespValue:
        """Send one command and answer its reply."""
        parts = [str(a).encode() for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self._sock.sendall(payload)
        reply = self._read()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def _line(self) -> bytes:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the Redis server closed the connection mid-reply")
        return line[:-2]

    def _read(self) -> RespValue:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("the Redis server closed the connection mid-reply")
            return data[:-2].decode("utf-8", "replace")
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self._read() for _ in range(count)]
        raise ConnectionError(f"not a RESP reply: {line[:60]!r}")


def resp_command(host: str, port: int, *args: str | int, timeout_s: float = 3.0) -> RespValue:
    """Open a connection, send one command, answer its reply.

    Raises:
        OSError: no connection, or no reply within ``timeout_s``.
        RespError: an error reply.
    """
    with RespClient(host, port, timeout_s) as client:
        return client.command(*args)


def info_fields(text: RespValue) -> dict[str, str]:
    """The ``key:value`` lines of an ``INFO`` reply."""
    fields: dict[str, str] = {}
    if isinstance(text, str):
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                fields[key.strip()] = value.strip()
    return fields


# ---------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


def http_get(host: str, port: int, path: str = "/", timeout_s: float = 3.0) -> HttpReply:
    """``GET http://host:port/path`` (no redirects followed).

    Raises:
        OSError: no connection or no answer within ``timeout_s``.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read(1024 * 1024).decode("utf-8", "replace")
        return HttpReply(resp.status, body, {k.lower(): v for k, v in resp.getheaders()})
    except http.client.HTTPException as exc:
        raise ConnectionError(f"bad HTTP answer from {host}:{port}: {exc!r}") from None
    finally:
        conn.close()


# ---------------------------------------------------------------------- DNS


@dataclass(frozen=True)
class DnsReply:
    """A DNS answer: ``rcode`` (0 NOERROR, 3 NXDOMAIN, 5 REFUSED...) and the A records."""

    rcode: int
    addresses: list[str]


_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def rcode_name(rcode: int) -> str:
    return _RCODES.get(rcode, f"RCODE{rcode}")


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if label else b""
        if not 0 < len(raw) < 64:
            raise ValueError(f"not a DNS name: {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        if pos >= len(msg):
            raise ValueError("truncated DNS name")
        size = msg[pos]
        if size == 0:
            return pos + 1
        if size & 0xC0 == 0xC0:  # a compression pointer ends the name
            return pos + 2
        pos += 1 + size


def _parse_a(msg: bytes, qid: int) -> DnsReply:
    if len(msg) < 12:
        raise ValueError("DNS answer shorter than its header")
    rid, flags, qd, an, _ns, _ar = struct.unpack("!6H", msg[:12])
    if rid != qid or not flags & 0x8000:
        raise ValueError("not the answer to our DNS query")
    pos = 12
    for _ in range(qd):
        pos = _skip_name(msg, pos) + 4
    addresses: list[str] = []
    for _ in range(an):
        pos = _skip_name(msg, pos)
        rtype, rclass, _ttl, size = struct.unpack("!HHIH", msg[pos : pos + 10])
        pos += 10
        rdata = msg[pos : pos + size]
        pos += size
        if rtype == 1 and rclass == 1 and size == 4:
            addresses.append(socket.inet_ntoa(rdata))
    return DnsReply(flags & 0x000F, addresses)


def dns_query_a(
    server: str, port: int, name: str, *, timeout_s: float = 1.0, tries: int = 3
) -> DnsReply:
    """Ask ``server:port`` over UDP for the A records of ``name`` (recursion desired).

    Raises:
        OSError: no answer after ``tries`` attempts of ``timeout_s`` each.
        ValueError: the answer is not a DNS message answering the query.
    """
    qid = secrets.randbelow(0x10000)
    query = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + _encode_name(name) + b"\x00\x01\x00\x01"
    last: OSError = TimeoutError(f"no DNS answer from {server}:{port}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        # Connected, so only the server's datagrams arrive and a closed port (ICMP port
        # unreachable) fails at once with ConnectionRefusedError instead of timing out.
        sock.connect((server, port))
        for _ in range(max(1, tries)):
            try:
                sock.send(query)
                while True:
                    data = sock.recv(4096)
                    if len(data) >= 2 and data[:2] == query[:2]:
                        return _parse_a(data, qid)
            except ConnectionRefusedError:
                raise
            except OSError as exc:  # a timeout: the datagram or its answer was lost
                last = exc
    raise last


def resolves_to(server: str, port: int, names: Iterable[tuple[str, str]]) -> list[str]:
    """The problems found asking ``server:port`` for each ``(name, expected address)``; empty
    when every name resolves to its address."""
    problems: list[str] = []
    for name, expected in names:
        try:
            reply = dns_query_a(server, port, name)
        except OSError as exc:  # the server does not answer: asking for more names won't help
            problems.append(f"{name}: no answer ({exc.strerror or str(exc) or type(exc).__name__})")
            break
        except ValueError as exc:
            problems.append(f"{name}: a broken answer ({exc})")
            continue
        if expected not in reply.addresses:
            got = ", ".join(reply.addresses) or rcode_name(reply.rcode)
            problems.append(f"{name}: expected {expected}, got {got}")
    return problems


# ---------------------------------------------------------------------- daemons on the server

#: POSIX shell functions to prepend to a script run on the server (``sh -c``):
#: ``pid_of PIDFILE COMM`` prints the pid in PIDFILE if that process is alive and named COMM (so a
#: stale pid file whose pid was reused is never trusted); ``pid_alive PID`` (a zombie is dead);
#: ``stop PIDFILE COMM WAIT_S`` sends TERM, waits up to WAIT_S seconds, then KILL, and removes
#: the pid file. Every function succeeds when there is nothing to stop.
DAEMON_SH = r"""
pid_alive() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/status" ] && grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; then
    return 1
  fi
  return 0
}
pid_of() {
  [ -s "$1" ] || return 1
  _pid=$(tr -dc 0-9 < "$1")
  [ -n "$_pid" ] || return 1
  pid_alive "$_pid" || return 1
  if [ -r "/proc/$_pid/comm" ] && [ "$(cat "/proc/$_pid/comm")" != "$2" ]; then
    return 1
  fi
  echo "$_pid"
}
stop() {
  if _spid=$(pid_of "$1" "$2"); then
    kill -TERM "$_spid" 2>/dev/null
    _n=0
    while pid_alive "$_spid"; do
      _n=$((_n + 1))
      if [ "$_n" -gt $(($3 * 10)) ]; then
        kill -KILL "$_spid" 2>/dev/null
        sleep 0.2
        break
      fi
      sleep 0.1
    done
    echo "stopped=$_spid"
  fi
  rm -f "$1"
}
"""


def parse_kv(text: str) -> dict[str, str]:
    """The ``key=value`` lines a script printed (later lines win)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and key.replace("_", "").isalnum():
            out[key] = value
    return out
