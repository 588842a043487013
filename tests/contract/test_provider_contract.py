"""The provider contract (docs/reference/extensions.md), one body per behaviour, run on the
backends of ``provider_backends.BACKENDS`` — real servers, real processes, no mocks.

What every provider does (create, delete, status, list, exec) runs on every backend. What only
an isolating provider does (an address of its own per server, ``delete`` killing what runs
inside, ...) runs on the backends whose capabilities (class data on the backend) say they have
it: each test is parametrised over exactly those, so every test case generated really runs.

Each test gets a workspace of its own (``tmp_path``) and a backend bound to it; the fixture's
teardown deletes every server the test made and then removes anything left with the test's
unique names, whether the test passed or not.
"""

from __future__ import annotations

import http.client
import ipaddress
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.contract.provider_backends import BACKENDS, Backend, ExtensionError

# An HTTP server of the current folder on ADDRESS:PORT. (Not `python -m http.server`: it looks
# its address up in DNS before it listens, and a server may have no resolver it can reach.)
SERVE = """\
import http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = sys.argv[1], int(sys.argv[2])
Server((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""

# Polls a server on ADDRESS:PORT from inside another server (bounded: 50 tries).
FETCH = """\
import http.client, sys, time
for _ in range(50):
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=1)
    try:
        conn.request("GET", sys.argv[3])
        print(conn.getresponse().read().decode())
        break
    except OSError:
        time.sleep(0.1)
    finally:
        conn.close()
else:
    sys.exit(1)
"""


def backends(having: Callable[[type[Backend]], bool] = lambda _: True) -> pytest.MarkDecorator:
    """Run the test on each backend ``having`` accepts (by its capabilities)."""
    names = [name for name, cls in BACKENDS.items() if having(cls)]
    return pytest.mark.parametrize("backend", names, indirect=True)


EVERY = backends()
OWN_ADDRESS = backends(lambda b: b.own_address)
ISOLATING = backends(lambda b: b.isolates)
NOT_ISOLATING = backends(lambda b: not b.isolates)
REPAIRING = backends(lambda b: b.repairs)
EXHAUSTIBLE = backends(lambda b: b.exhaustible)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    b = BACKENDS[request.param].open(workspace)
    try:
        yield b
    finally:
        b.close()


def http_get(address: str, port: int, path: str, timeout_s: float = 10.0) -> str:
    """GET from the test process, polling until the server answers (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection(address, port, timeout=1)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, (resp.status, body)
            return body
        except OSError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers on {address}:{port}: {exc}") from None
        finally:
            conn.close()
        time.sleep(0.1)


def serve_http(backend: Backend, host: str, address: str, content: str) -> tuple[int, int]:
    """Start an HTTP server in the background on ``host`` serving ``/hello.txt``; its pid, port."""
    write = "import sys; open('hello.txt', 'w').write(sys.argv[1])"
    assert backend.exec(host, [backend.python, "-c", write, content])["exit_code"] == 0
    port = backend.free_port(address)
    argv = [backend.python, "-c", SERVE, address, str(port)]
    out = backend.exec(host, argv, background=True)
    assert out["exit_code"] == 0, out
    assert isinstance(out["pid"], int)
    return out["pid"], port


@EVERY
def test_create_answers_a_running_server_with_an_address(backend: Backend) -> None:
    server = backend.create("web-01")
    assert server["hostname"] == "web-01"
    assert server["status"] == "running"
    assert server["provider_id"]
    ipaddress.IPv4Address(server["address"])
    status = backend.status("web-01")
    assert (status["status"], status["address"], status["provider_id"]) == (
        "running",
        server["address"],
        server["provider_id"],
    )


@EVERY
def test_create_is_idempotent(backend: Backend) -> None:
    first = backend.create("web-01")
    again = backend.create("web-01")
    assert (again["provider_id"], again["address"]) == (first["provider_id"], first["address"])
    assert again["status"] == "running"
    assert [s["hostname"] for s in backend.list_servers(["web-01"])] == ["web-01"]


@EVERY
def test_parallel_creates_all_succeed(backend: Backend) -> None:
    hosts = [f"par-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(hosts)) as pool:
        servers = list(pool.map(backend.create, hosts))
    assert [s["hostname"] for s in servers] == hosts
    assert all(s["status"] == "running" and s["provider_id"] for s in servers)
    listed = {s["hostname"]: s for s in backend.list_servers(hosts)}
    assert set(listed) == set(hosts)
    assert all(s["status"] == "running" for s in listed.values())


@OWN_ADDRESS
def test_parallel_creates_get_distinct_addresses(backend: Backend) -> None:
    hosts = [f"par-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(hosts)) as pool:
        servers = list(pool.map(backend.create, hosts))
    assert len({s["address"] for s in servers}) == len(hosts)
    assert len({s["provider_id"] for s in servers}) == len(hosts)
    assert all(s["status"] == "running" for s in servers)


@EVERY
def test_status_and_list_answer_what_exists(backend: Backend) -> None:
    ghost = backend.status("ghost")
    assert ghost["status"] == "absent"
    assert ghost["address"] is None
    assert backend.list_servers(["web-01", "db-01"]) == []
    made = {h: backend.create(h) for h in ("web-01", "db-01")}
    listed = {s["hostname"]: s for s in backend.list_servers(["web-01", "db-01"])}
    assert set(listed) == set(made)
    for host, server in made.items():
        assert listed[host]["status"] == "running"
        assert listed[host]["address"] == server["address"]
        assert listed[host]["provider_id"] == server["provider_id"]


@EVERY
def test_exec_runs_inside_the_server(backend: Backend) -> None:
    backend.assert_inside(backend.create("web-01"))


@EVERY
def test_exec_answers_output_input_env_and_exit_code(backend: Backend) -> None:
    backend.create("web-01")
    code = (
        "import os, sys\n"
        "print(sys.stdin.read().upper() + os.environ['GREETING'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    out = backend.exec(
        "web-01", [backend.python, "-c", code], input="hello ", env={"GREETING": "world"}
    )
    assert out == {"exit_code": 3, "stdout": "HELLO world\n", "stderr": "to stderr\n"}
    ok = backend.exec("web-01", ["true"])
    assert (ok["exit_code"], ok["stdout"], ok["stderr"]) == (0, "", "")


@EVERY
def test_exec_that_cannot_run_is_an_error(backend: Backend) -> None:
    with pytest.raises(ExtensionError, match="create it first"):
        backend.exec("ghost", ["true"])
    backend.create("web-01")
    with pytest.raises(ExtensionError, match="not found"):
        backend.exec("web-01", ["/no/such/command-prvng"])


@EVERY
def test_background_process_is_reachable_from_the_host(backend: Backend) -> None:
    server = backend.create("web-01")
    pid, port = serve_http(backend, "web-01", server["address"], "hello from web-01")
    assert backend.process_alive(pid)
    assert http_get(server["address"], port, "/hello.txt") == "hello from web-01"
    assert backend.process_alive(pid)  # it outlived the exec call and the request


@OWN_ADDRESS
def test_two_servers_get_different_addresses_and_reach_each_other(backend: Backend) -> None:
    web, db = backend.create("web-01"), backend.create("db-01")
    assert web["address"] != db["address"]
    assert web["provider_id"] != db["provider_id"]
    _, port = serve_http(backend, "db-01", db["address"], "hello from db-01")
    out = backend.exec(
        "web-01", [backend.python, "-c", FETCH, db["address"], str(port), "/hello.txt"]
    )
    assert (out["exit_code"], out["stdout"].strip()) == (0, "hello from db-01"), out


@EVERY
def test_delete_removes_the_server_and_a_second_delete_finds_nothing(backend: Backend) -> None:
    backend.create("web-01")
    assert backend.delete("web-01") is True
    assert backend.status("web-01")["status"] == "absent"
    assert backend.list_servers(["web-01"]) == []
    with pytest.raises(ExtensionError, match="create it first"):
        backend.exec("web-01", ["true"])
    assert backend.delete("web-01") is False
    assert backend.leftovers() == []


@ISOLATING
def test_delete_kills_everything_started_inside(backend: Backend) -> None:
    server = backend.create("web-01")
    pid, port = serve_http(backend, "web-01", server["address"], "bye")
    http_get(server["address"], port, "/hello.txt")
    # A background shell whose child records its own pid: descendants must go too.
    spawn = "sleep 300 & echo $! > child.pid; wait"
    shell = backend.exec("web-01", ["sh", "-c", spawn], background=True)
    wait = "for i in $(seq 50); do test -s child.pid && break; sleep 0.1; done; cat child.pid"
    child = backend.exec("web-01", ["sh", "-c", wait])
    child_pid = int(child["stdout"])
    assert all(backend.process_alive(p) for p in (pid, shell["pid"], child_pid))

    assert backend.delete("web-01") is True
    assert not any(backend.process_alive(p) for p in (pid, shell["pid"], child_pid))
    assert backend.status("web-01")["status"] == "absent"
    assert backend.leftovers() == []


@NOT_ISOLATING
def test_delete_of_a_server_that_is_not_isolated_leaves_the_host_alone(backend: Backend) -> None:
    backend.create("web-01")
    started = backend.exec("web-01", ["sleep", "300"], background=True)
    assert backend.process_alive(started["pid"])
    assert backend.delete("web-01") is True
    assert backend.status("web-01")["status"] == "absent"
    assert backend.process_alive(started["pid"])  # still there: teardown kills it


@EVERY
def test_deleting_the_last_server_leaves_nothing_behind(backend: Backend) -> None:
    for host in ("web-01", "db-01"):
        backend.create(host)
    assert backend.delete("web-01") is True
    assert backend.status("db-01")["status"] == "running"  # the other server is untouched
    assert backend.exec("db-01", ["true"])["exit_code"] == 0
    assert backend.delete("db-01") is True
    assert backend.leftovers() == []


@REPAIRING
def test_create_repairs_a_half_made_server(backend: Backend) -> None:
    server = backend.create("web-01")
    backend.break_server(server)
    assert backend.status("web-01")["status"] == "stopped"
    repaired = backend.create("web-01")
    assert repaired["status"] == "running"
    assert (repaired["provider_id"], repaired["address"]) == (
        server["provider_id"],
        server["address"],
    )
    backend.assert_inside(repaired)


@EVERY
def test_bad_settings_are_refused_with_a_clear_error(backend: Backend) -> None:
    cases = backend.bad_settings()
    assert cases, f"{backend.name} names no settings it refuses"
    for settings, pattern in cases:
        with pytest.raises(ExtensionError, match=pattern):
            backend.create("web-01", settings)
        assert backend.status("web-01")["status"] == "absent"


@EXHAUSTIBLE
def test_an_exhausted_address_range_is_a_clear_error(backend: Backend) -> None:
    settings = backend.one_server_settings()
    backend.create("web-01", settings)
    with pytest.raises(ExtensionError, match="address range exhausted"):
        backend.create("db-01", settings)
    assert backend.status("db-01")["status"] == "absent"
    assert backend.status("web-01")["status"] == "running"
