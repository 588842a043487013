"""Benchmark: the web UI's pages on a real platform with 1,000 workflows and a 500-task DAG in
the store, against ``GET /health`` of the same control center in the same run.

The platform (control center + orchestrator, as ``platform.embedded.build_services`` wires them,
no NATS) runs in a child process (this script with ``--serve``), each service served by uvicorn
on a loopback port through ``platform.supervisor.run_services``, so the measuring client does
not share the server's interpreter. The store is filled over the API with the admin's token:
``--workflows`` one-task ``noop`` workflows and one workflow of ``--dag`` ``noop`` tasks
(layers of 50, each task after the first layer depending on 2 of the previous one).

1. **Server time**: ``--requests`` sequential requests per page with a logged-in session cookie
   (login through ``POST /ui/login`` with the form's CSRF token), interleaved over ``--rounds``
   rounds, keep-alive, measured by the client on loopback: p50/p95 of ``GET /ui/`` (dashboard),
   ``GET /ui/workflows`` (list), ``GET /ui/workflows/{id}`` (the DAG), and the ratio of each p50
   to that of ``GET /health`` in the same rounds.
2. **First paint**: headless Chromium (Playwright, ``/usr/bin/chromium``), logged in through
   the form, ``--paints`` navigations per page: first-paint / first-contentful-paint from
   ``performance.getEntriesByType('paint')``, and the navigation's ``responseEnd``.
3. **Log view**: a task printing ``--rate`` timestamped lines per second for ``--seconds``
   seconds, followed on ``/ui/tasks/{id}/logs``; every 0.5 s: lag between now and the
   timestamp of the last line shown, lines kept in the page, JS heap (CDP
   ``Performance.getMetrics``); at the end, the lag of the task's last line.

Every service binds its socket with ``IPPROTO_TCP`` (``supervisor.bind_socket``), so accepted
connections have ``TCP_NODELAY``; before that a kept-alive answer waited ~40 ms for the client's
delayed ACK (the old ``--nodelay`` flag of this script did it in the child). With
``PRVNG_BENCH_PROFILE=FILE`` the serving child runs under cProfile and writes its stats to FILE
when it stops (``python -m pstats FILE``).

    .venv/bin/python -P bench/ui_pages.py [--server-only] [--workflows 1000] [--dag 500]
        [--requests 40] [--rounds 3] [--paints 5] [--rate 5000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ADMIN = "bench ui admin passphrase"
CHROMIUM = "/usr/bin/chromium"
MAX_LINES = 5000  # what the log page keeps (task_views.MAX_LINES)
TARGET_MS = 50.0
TARGET_PAINT_MS = 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


# ---------------------------------------------------------------------- the platform (child)


def serve(home: Path, cc_port: int, orch_port: int) -> None:
    from provisioning.core.settings import load_settings
    from provisioning.platform import supervisor
    from provisioning.platform.embedded import build_services

    settings = load_settings(
        home=home,
        env={},
        overrides={
            "orchestrator": {"port": orch_port, "host": "127.0.0.1", "max_tasks": 100000},
            "control_center": {"admin_password": ADMIN, "port": cc_port, "host": "127.0.0.1"},
        },
    )
    _, services = build_services(settings)
    profile = os.environ.get("PRVNG_BENCH_PROFILE")
    if not profile:
        asyncio.run(supervisor.run_services(services))
        return
    import cProfile

    with cProfile.Profile() as prof:  # the whole serving process, written when it stops
        asyncio.run(supervisor.run_services(services))
    prof.dump_stats(profile)


class Platform:
    def __init__(self, home: Path) -> None:
        self.cc_port, self.orch_port = free_port(), free_port()
        self.cc = f"http://127.0.0.1:{self.cc_port}"
        self.orch = f"http://127.0.0.1:{self.orch_port}"
        ports = [str(self.cc_port), str(self.orch_port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-P", __file__, "--serve", str(home), *ports],
            stdout=subprocess.DEVNULL,
            stderr=open(home.parent / "serve.log", "wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if (
                    httpx.get(self.cc + "/health", timeout=1).status_code == 200
                    and httpx.get(self.orch + "/health", timeout=1).status_code == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the platform did not start: see serve.log")
            time.sleep(0.2)
        resp = httpx.post(self.cc + "/auth/login", json={"username": "admin", "password": ADMIN})
        resp.raise_for_status()
        self.admin = {"Authorization": f"Bearer {resp.json()['data']['access_token']}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def submit(self, spec: dict[str, Any], http: httpx.Client | None = None) -> dict[str, Any]:
        client = http or httpx.Client(timeout=30)
        resp = client.post(self.orch + "/workflows", headers=self.admin, json=spec)
        resp.raise_for_status()
        return dict(resp.json()["data"])

    def workflow(self, wf_id: str) -> dict[str, Any]:
        resp = httpx.get(f"{self.orch}/workflows/{wf_id}", headers=self.admin, timeout=30)
        resp.raise_for_status()
        return dict(resp.json()["data"])

    def fill(self, n: int, dag: int) -> str:
        """``n`` one-task workflows and one ``dag``-task workflow; answers the DAG's id."""
        one = {"name": "bench-ui", "tasks": [{"name": "a", "action": "noop"}]}

        def many(k: int) -> None:
            with httpx.Client(timeout=30) as http:
                for _ in range(k):
                    self.submit(one, http)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(many, [n // 4 + (1 if i < n % 4 else 0) for i in range(4)]))
        width = 50
        tasks = []
        for i in range(dag):
            layer, j = divmod(i, width)
            task: dict[str, Any] = {"name": f"t{layer}-{j}", "action": "noop"}
            if layer:
                task["depends_on"] = [f"t{layer - 1}-{j}", f"t{layer - 1}-{(j + 1) % width}"]
            tasks.append(task)
        wf = self.submit({"name": f"bench-dag-{dag}", "tasks": tasks})
        self.until_done(wf["id"])
        return str(wf["id"])

    def until_done(self, wf_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            wf = self.workflow(wf_id)
            if wf["status"] in ("Completed", "Failed", "Cancelled", "RolledBack"):
                return wf
            if time.monotonic() > deadline:
                raise SystemExit(f"workflow {wf_id} did not finish")
            time.sleep(0.5)


# ---------------------------------------------------------------------- 1. server time


class Session:
    """A logged-in UI session over plain HTTP on loopback (the ``__Host-`` cookies are
    ``Secure``, which httpx's jar will not send over http, so the cookies are kept here)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, timeout=30)
        self.cookies: dict[str, str] = {}

    def _keep(self, resp: httpx.Response) -> None:
        for header in resp.headers.get_list("set-cookie"):
            name, value = header.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value

    def get(self, path: str) -> httpx.Response:
        resp = self.http.get(path, headers={"Cookie": self.cookie()})
        self._keep(resp)
        return resp

    def cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items() if v)

    def login(self) -> None:
        page = self.get("/ui/login")
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert found, page.text
        resp = self.http.post(
            "/ui/login",
            data={"username": "admin", "password": ADMIN, "csrf_token": html.unescape(found[1])},
            headers={"Cookie": self.cookie(), "Origin": self.base, "Sec-Fetch-Site": "same-origin"},
        )
        self._keep(resp)
        assert resp.status_code == 303, (resp.status_code, resp.text[:500])


def server_times(
    plat: Platform, pages: dict[str, str], n: int, rounds: int
) -> dict[str, list[float]]:
    s = Session(plat.cc)
    s.login()
    out: dict[str, list[float]] = {name: [] for name in pages}
    for path in pages.values():  # warm up (templates compiled, pools open, caches)
        for _ in range(3):
            assert s.get(path).status_code == 200, path
    for _ in range(rounds):
        for name, path in pages.items():
            for _ in range(n):
                t0 = time.perf_counter()
                resp = s.get(path)
                out[name].append((time.perf_counter() - t0) * 1000)
                assert resp.status_code == 200, (path, resp.status_code)
    return out


# ---------------------------------------------------------------------- 2. and 3. Chromium


def browser_login(context: Any, base: str) -> Any:
    page = context.new_page()
    page.goto(base + "/ui/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", ADMIN)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#logout")
    return page


PAINT_JS = """() => {
  const out = {};
  for (const e of performance.getEntriesByType('paint')) out[e.name] = e.startTime;
  const nav = performance.getEntriesByType('navigation')[0];
  out.responseEnd = nav ? nav.responseEnd : null;
  out.domContentLoaded = nav ? nav.domContentLoadedEventEnd : null;
  return out;
}"""


def paints(browser: Any, base: str, pages: dict[str, str], n: int) -> dict[str, dict[str, list]]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = browser_login(context, base)
    out: dict[str, dict[str, list[float]]] = {
        name: {"first-paint": [], "first-contentful-paint": [], "responseEnd": []} for name in pages
    }
    for _ in range(n):
        for name, path in pages.items():
            page.goto("about:blank")
            page.goto(base + path, wait_until="load")
            page.wait_for_function(
                "() => performance.getEntriesByType('paint').length >= 2", timeout=15_000
            )
            got = page.evaluate(PAINT_JS)
            for key, values in out[name].items():
                if got.get(key) is not None:
                    values.append(float(got[key]))
    context.close()
    return out


LOG_TASK = """
import sys, time
rate, seconds = {rate}, {seconds}
pad = "x" * 40
t0 = time.time()
i = 0
total = rate * seconds
w = sys.stdout.write
while i < total:
    due = min(total, int((time.time() - t0) * rate) + 1)
    while i < due:
        i += 1
        w("%.6f line %d %s\\n" % (time.time(), i, pad))
    sys.stdout.flush()
    time.sleep(0.001)
sys.stdout.write("%.6f END %d\\n" % (time.time(), i))
sys.stdout.flush()
"""

SAMPLE_JS = """() => {
  const box = document.getElementById('log-lines');
  let last = box && box.lastElementChild;
  while (last && last.classList.contains('system')) last = last.previousElementSibling;
  return {
    text: last ? last.getAttribute('data-text') : '',
    kept: box ? box.childElementCount : 0,
    count: (document.getElementById('log-count') || {}).textContent || '',
    ended: document.getElementById('log-viewer').getAttribute('data-ended'),
  };
}"""


def log_follow(browser: Any, plat: Platform, rate: int, seconds: int) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = browser_login(context, plat.cc)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    code = LOG_TASK.format(rate=rate, seconds=seconds)
    wf = plat.submit(
        {"name": "bench-log", "tasks": [{"name": "talk", "command": ["python3", "-c", code]}]}
    )
    task_id = ""
    deadline = time.monotonic() + 30
    while not task_id:
        tasks = plat.workflow(wf["id"]).get("tasks") or []
        if tasks and tasks[0].get("status") in ("Running", "Completed"):
            task_id = str(tasks[0]["id"])
        elif time.monotonic() > deadline:
            raise SystemExit("the log task did not start")
        else:
            time.sleep(0.05)
    page.goto(f"{plat.cc}/ui/tasks/{task_id}/logs")
    samples: list[dict[str, Any]] = []
    end_lag = None
    deadline = time.monotonic() + seconds + 120
    while time.monotonic() < deadline:
        got = page.evaluate(SAMPLE_JS)
        now = time.time()
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        text = got["text"] or ""
        stamp = re.match(r"(\d+\.\d+) ", text)
        lag = now - float(stamp[1]) if stamp else None
        samples.append(
            {
                "t": now,
                "lag": lag,
                "kept": got["kept"],
                "heap": metrics.get("JSHeapUsedSize", 0) / 2**20,
                "nodes": metrics.get("Nodes", 0),
                "last": text[:40],
            }
        )
        if " END " in text and end_lag is None:
            end_lag = lag
        if got["ended"] or end_lag is not None:
            break
        time.sleep(0.5)
    count = page.evaluate("() => document.getElementById('log-count').textContent")
    plat.until_done(wf["id"], 60)
    context.close()
    return {"samples": samples, "end_lag": end_lag, "count": count}


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workflows", type=int, default=1000)
    ap.add_argument("--dag", type=int, default=500)
    ap.add_argument("--requests", type=int, default=40, help="per page per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paints", type=int, default=5, help="navigations per page")
    ap.add_argument("--rate", type=int, default=5000, help="log lines per second")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument(
        "--server-only", action="store_true", help="measure server time only (no Chromium)"
    )
    ap.add_argument(
        "--serve", nargs=3, metavar=("HOME", "CC_PORT", "ORCH_PORT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), int(args.serve[2]))
        return

    rows: list[tuple[str, str, str, str]] = []  # what, figure, target, verdict
    print(f"{os.cpu_count()} cores, CPython {sys.version.split()[0]}, load at start {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        plat = Platform(Path(tmp) / "home")
        try:
            t0 = time.perf_counter()
            dag_id = plat.fill(args.workflows, args.dag)
            print(
                f"store: {args.workflows} workflows + a {args.dag}-task DAG in "
                f"{time.perf_counter() - t0:.1f} s (load {load()})"
            )
            pages = {
                "health (baseline)": "/health",
                "dashboard /ui/": "/ui/",
                "list /ui/workflows": "/ui/workflows",
                f"detail ({args.dag}-task DAG)": f"/ui/workflows/{dag_id}",
            }
            times = server_times(plat, pages, args.requests, args.rounds)
            print(
                f"\n1. server time, {args.requests} x {args.rounds} requests each (load {load()})"
            )
            base = statistics.median(times["health (baseline)"])
            print(f"{'page':28} {'p50 ms':>8} {'p95 ms':>8} {'x health':>9}")
            for name, xs in times.items():
                p50, p95 = statistics.median(xs), pct(xs, 95)
                print(f"{name:28} {p50:8.1f} {p95:8.1f} {p50 / base:9.1f}")
                if name != "health (baseline)":
                    ok = "PASS" if p50 < TARGET_MS else "MISS"
                    rows.append(
                        (f"server p50 {name}", f"{p50:.1f} ms (p95 {p95:.1f})", "< 50 ms", ok)
                    )

            if not args.server_only:
                from playwright.sync_api import sync_playwright

                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
                    try:
                        ui_pages = {k: v for k, v in pages.items() if v != "/health"}
                        got = paints(browser, plat.cc, ui_pages, args.paints)
                        print(f"\n2. Chromium, median of {args.paints} navigations (load {load()})")
                        print(
                            f"{'page':28} {'response':>9} {'FP ms':>8} {'FCP ms':>8} {'FCP max':>8}"
                        )
                        for name, d in got.items():
                            fcp = d["first-contentful-paint"]
                            print(
                                f"{name:28} {statistics.median(d['responseEnd']):9.0f} "
                                f"{statistics.median(d['first-paint']):8.0f} "
                                f"{statistics.median(fcp):8.0f} {max(fcp):8.0f}"
                            )
                            ok = "PASS" if statistics.median(fcp) < TARGET_PAINT_MS else "MISS"
                            rows.append(
                                (
                                    f"first contentful paint {name}",
                                    f"{statistics.median(fcp):.0f} ms",
                                    "< 1 s",
                                    ok,
                                )
                            )
                        res = log_follow(browser, plat, args.rate, args.seconds)
                    finally:
                        browser.close()
                s = res["samples"]
                print(
                    f"\n3. log view, {args.rate} lines/s for {args.seconds} s (load {load()}); "
                    f"every ~0.5 s: lag of the last line shown, lines kept, JS heap"
                )
                for x in s:
                    lag = "-" if x["lag"] is None else f"{x['lag'] * 1000:7.0f} ms"
                    print(
                        f"  t+{x['t'] - s[0]['t']:5.1f}s lag {lag:>10}  kept {x['kept']:5d}  "
                        f"heap {x['heap']:6.1f} MiB  nodes {x['nodes']:.0f}"
                    )
                lags = [x["lag"] for x in s if x["lag"] is not None]
                heaps = [x["heap"] for x in s]
                third = max(1, len(heaps) // 3)
                print(f"  page says: {res['count']}; last line's lag {res['end_lag']}")
                lag50 = statistics.median(lags) if lags else float("inf")
                rows.append(
                    (
                        "log view: median lag while following",
                        f"{lag50 * 1000:.0f} ms (max {max(lags, default=0) * 1000:.0f})",
                        "< 1 s",
                        "PASS" if lag50 < 1 else "MISS",
                    )
                )
                end = res["end_lag"]
                rows.append(
                    (
                        "log view: lag of the task's last line",
                        "-" if end is None else f"{end * 1000:.0f} ms",
                        "< 1 s",
                        "PASS" if end is not None and end < 1 else "MISS",
                    )
                )
                kept = max(x["kept"] for x in s)
                rows.append(
                    (
                        "log view: lines kept (max)",
                        str(kept),
                        f"<= {MAX_LINES}",
                        "PASS" if kept <= MAX_LINES else "MISS",
                    )
                )
                mid, last = max(heaps[third : 2 * third] or heaps), max(heaps[2 * third :] or heaps)
                rows.append(
                    (
                        "log view: JS heap, max of last third / middle third",
                        f"{last:.1f} / {mid:.1f} MiB",
                        "bounded (<= 1.5x)",
                        "PASS" if last <= 1.5 * mid else "MISS",
                    )
                )
        finally:
            plat.stop()
    print(f"\nload at end {load()}\n")
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  {'figure':28} {'target':18} verdict")
    for what, fig, target, ok in rows:
        print(f"{what:{w}}  {fig:28} {target:18} {ok}")


if __name__ == "__main__":
    main()
