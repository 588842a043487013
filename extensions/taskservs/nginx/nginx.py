#!/usr/bin/env python3
"""Task service ``nginx``: a static web server on the server's address.

Settings: ``port`` (8080), ``content`` (the page; default ``hello from <hostname>``). It writes
``etc/nginx.conf`` and ``srv/www/index.html`` in the server's folder and runs
``nginx -p <folder>/ -c etc/nginx.conf`` in the foreground of a background process; every path
of the configuration (pid, logs, temporary files, root) is relative to that prefix.

* ``install`` writes both files, starts nginx unless it runs (then a changed configuration is
  reloaded with HUP), and waits until the page is served;
* ``check`` fetches ``http://address:port/`` from here and compares the page;
* ``remove`` stops it (TERM, then KILL after 10 s) and deletes its configuration and pages.
"""

from __future__ import annotations

from typing import Any

from provisioning.workspace.sdk import Failure, Request, run, wait_until
from provisioning.workspace.sdk_net import (
    DAEMON_SH,
    address_of,
    http_get,
    parse_kv,
    port_open,
    port_setting,
)

DEFAULT_PORT = 8080
START_WAIT_S = 15.0
STOP_WAIT_S = 10

_CONF = """\
# Written by the nginx task service. Paths are relative to the prefix (-p <server folder>/).
daemon off;
worker_processes 1;
pid run/nginx.pid;
error_log log/nginx-error.log;
events {{
    worker_connections 256;
}}
http {{
    access_log log/nginx-access.log;
    client_body_temp_path run/nginx/client_body;
    proxy_temp_path run/nginx/proxy;
    fastcgi_temp_path run/nginx/fastcgi;
    uwsgi_temp_path run/nginx/uwsgi;
    scgi_temp_path run/nginx/scgi;
    types {{
        text/html html htm;
        text/plain txt;
        text/css css;
        application/javascript js;
        application/json json;
    }}
    default_type application/octet-stream;
    server {{
        listen {address}:{port};
        server_name _;
        root srv/www;
        index index.html;
    }}
}}
"""

# As root, the workers run as root too: the server's folder may be private to its owner.
_PREPARE_SH = (
    DAEMON_SH
    + r"""
set -e
mkdir -p etc srv/www log run/nginx
echo "root=$(pwd)"
printf '%s' "$2" > srv/www/index.html.new
mv -f srv/www/index.html.new srv/www/index.html
{ if [ "$(id -u)" = 0 ]; then echo "user root;"; fi; printf '%s' "$1"; } > etc/nginx.conf.new
if cmp -s etc/nginx.conf.new etc/nginx.conf; then
  rm -f etc/nginx.conf.new
  changed=0
else
  mv -f etc/nginx.conf.new etc/nginx.conf
  changed=1
fi
if pid=$(pid_of run/nginx.pid nginx); then
  echo "state=running"
  echo "pid=$pid"
  if [ "$changed" = 1 ]; then kill -HUP "$pid"; echo "reloaded=1"; fi
else
  rm -f run/nginx.pid
  echo "state=stopped"
fi
"""
)

_REMOVE_SH = (
    DAEMON_SH
    + r"""
stop run/nginx.pid nginx "$1"
rm -rf etc/nginx.conf etc/nginx.conf.new srv/www run/nginx
echo "root=$(pwd)"
"""
)

_LOG_TAIL_SH = "tail -n 5 log/nginx-error.log log/nginx.out 2>/dev/null"


def _where(req: Request) -> tuple[str, str, int]:
    host = str(req.server.get("hostname"))
    return host, address_of(req.server), port_setting(req.settings, DEFAULT_PORT)


def _content(req: Request, host: str) -> str:
    content = req.settings.get("content", f"hello from {host}")
    if not isinstance(content, str):
        raise Failure(f"settings.content must be a string, got {type(content).__name__}")
    return content


def _serves(address: str, port: int, content: str) -> tuple[bool, str]:
    reply = http_get(address, port, "/", timeout_s=2.0)
    if reply.status != 200:
        return False, f"HTTP {reply.status}"
    if reply.body.strip() != content.strip():
        return False, f"a page that is not the content: {reply.body[:80]!r}"
    return True, "ok"


def install(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    content = _content(req, host)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True, "address": address, "port": port}}
    conf = _CONF.format(address=address, port=port)
    out = req.exec(["sh", "-c", _PREPARE_SH, "sh", conf, content.rstrip("\n") + "\n"], timeout_s=30)
    state = parse_kv(out.check(f"writing the nginx configuration on {host}").stdout)
    root = state.get("root", "")
    if not root.startswith("/"):  # every path below is under it: never guess
        raise Failure(f"the server's folder is unknown (pwd answered {root!r})")
    started = state.get("state") != "running"
    if started:
        req.progress(f"nginx: starting nginx on {host} at {address}:{port}")
        argv = ["nginx", "-p", f"{root}/", "-e", f"{root}/log/nginx-error.log"]
        argv += ["-c", "etc/nginx.conf"]
        req.exec(
            ["sh", "-c", 'exec "$@" >>log/nginx.out 2>&1', "sh", *argv], background=True
        ).check(f"starting nginx on {host}")
    elif state.get("reloaded"):
        req.progress(f"nginx: configuration changed on {host}; reloaded (pid {state.get('pid')})")
    try:
        wait_until(
            f"nginx serving the page on {address}:{port}",
            lambda: _serves(address, port, content)[0],
            timeout_s=START_WAIT_S,
        )
    except Failure:
        tail = req.exec(["sh", "-c", _LOG_TAIL_SH], timeout_s=15).stdout.strip()
        raise Failure(
            f"nginx on {host} did not serve the page on http://{address}:{port}/ within "
            f"{START_WAIT_S:g} s; its log ends:\n{tail or '(empty)'}"
        ) from None
    return {
        "ok": True,
        "details": {
            "url": f"http://{address}:{port}/",
            "started": started,
            "reloaded": state.get("reloaded") == "1",
            "root": root,
        },
    }


def check(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    url = f"http://{address}:{port}/"
    try:
        ok, why = _serves(address, port, _content(req, host))
    except OSError as exc:
        raise Failure(
            f"nginx on {host} does not answer {url}: {exc.strerror or repr(exc)}"
        ) from None
    if not ok:
        raise Failure(f"nginx on {host} answered {url} with {why}")
    return {"ok": True, "details": {"url": url, "status": 200}}


def remove(req: Request) -> dict[str, Any]:
    host, address, port = _where(req)
    if req.context.get("dry_run"):
        return {"ok": True, "details": {"dry_run": True}}
    req.progress(f"nginx: stopping nginx on {host} and deleting its configuration and pages")
    out = req.exec(["sh", "-c", _REMOVE_SH, "sh", str(STOP_WAIT_S)], timeout_s=STOP_WAIT_S + 20)
    state = parse_kv(out.check(f"stopping nginx on {host}").stdout)
    try:
        wait_until(
            f"{address}:{port} closed",
            lambda: not port_open(address, port, 0.5),
            timeout_s=STOP_WAIT_S,
        )
    except Failure:
        raise Failure(
            f"nginx on {host}: something still listens on {address}:{port} after stopping"
        ) from None
    return {"ok": True, "details": {"stopped": state.get("stopped"), "root": state.get("root")}}


if __name__ == "__main__":
    run({"install": install, "remove": remove, "check": check})
