"""Fixtures of the web UI's browser tests: a real platform, Debian's Chromium, logged-in pages.

* ``ui_platform`` (one per test module): ``prvng platform start`` in a temp data dir
  (``tests/e2e/platform_proc.running_platform``), the control center's URL, ``create_user``
  and ``prvng`` (as the first-run admin) helpers.
* ``browser`` (one per module): headless ``/usr/bin/chromium`` driven by Playwright.
  ``scripts/ensure-services.sh`` installs it; the tests are skipped only when it is missing
  and cannot be installed.
* ``ui`` (per test): a fresh browser context (1280x800) on the control center whose every
  request and console error is recorded; at the end the test fails if any request went to a
  host other than the platform's own or the page broke its Content-Security-Policy.
  ``ui.login(role=...)`` creates a user with that role and logs in through the form;
  ``ui.shot(name)`` saves a screenshot under ``artifacts``.
* ``artifacts``: ``$ARTIFACTS/browser/<test>/`` when ``ARTIFACTS`` is set, else
  ``<tmp_path>/artifacts/``.

Tests are plain (sync) functions: Playwright's sync API must not run inside an event loop.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from provisioning.platform.pidfile import PidFile
from tests.e2e.platform_proc import Platform, prvng, running_platform, show

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}


def _chromium() -> Path:
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
            capture_output=True,
            check=False,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed and cannot be (scripts/ensure-services.sh)")
    return CHROMIUM


@dataclass
class UiPlatform:
    """A running platform as the browser tests use it."""

    plat: Platform
    cc_url: str

    @property
    def data_dir(self) -> Path:
        return self.plat.data_dir

    @property
    def host(self) -> str:
        return urlsplit(self.cc_url).netloc

    def prvng(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """A CLI command as the first-run admin."""
        done = prvng(*args, data_dir=self.data_dir, stdin=stdin)
        assert done.returncode == 0, show(done)
        return done

    def create_user(self, role: str, name: str | None = None) -> tuple[str, str]:
        """A new user with ``role``; answers (username, password)."""
        username = name or f"{role}-{secrets.token_hex(3)}"
        password = f"browser passphrase {secrets.token_hex(8)}"
        self.prvng("user", "create", username, "--role", role, "--password-stdin", stdin=password)
        return username, password


@pytest.fixture(scope="module")
def ui_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiPlatform]:
    data_dir = tmp_path_factory.mktemp("ui-platform") / "data"
    with running_platform(data_dir) as plat:
        cc_url = PidFile(data_dir / "run").url(1)
        assert cc_url, "the platform did not record the control center's URL"
        yield UiPlatform(plat, cc_url.rstrip("/"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(executable), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    root = os.environ.get("ARTIFACTS")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    out = Path(root) / "browser" / name if root else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class UiSession:
    """A browser context on the platform's UI, recording what its pages ask for."""

    platform: UiPlatform
    context: Any
    page: Any
    artifacts: Path
    requests: list[str] = field(default_factory=list)
    htmx: list[dict[str, str]] = field(default_factory=list)  # headers of htmx's requests
    problems: list[str] = field(default_factory=list)
    username: str = ""

    def url(self, path: str) -> str:
        return self.platform.cc_url + path

    def goto(self, path: str) -> Any:
        return self.page.goto(self.url(path))

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def login(
        self, role: str = "admin", *, username: str = "", password: str = "", code: str = ""
    ) -> str:
        """Log in through the form (a new user with ``role`` unless ``username`` is given);
        ``code``: the TOTP code for the second step. Answers the username."""
        if not username:
            username, password = self.platform.create_user(role)
        self.goto("/ui/login")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("#login-form button[type=submit]")
        if code:
            self.page.wait_for_url(re.compile(r"/ui/login/mfa$"))
            self.page.fill("input[name=code]", code)
            self.page.click("#mfa-form button[type=submit]")
        self.page.wait_for_selector("#logout")
        self.username = username
        return username

    def foreign_requests(self) -> list[str]:
        own = self.platform.host
        return [u for u in self.requests if urlsplit(u).netloc != own]


@pytest.fixture
def ui(ui_platform: UiPlatform, browser: Any, artifacts: Path) -> Iterator[UiSession]:
    context = browser.new_context(viewport=VIEWPORT, base_url=ui_platform.cc_url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    session = UiSession(ui_platform, context, page, artifacts)

    def request(req: Any) -> None:
        session.requests.append(req.url)
        if req.headers.get("hx-request"):
            session.htmx.append(dict(req.headers))

    page.on("request", request)
    page.on("pageerror", lambda err: session.problems.append(f"page error: {err}"))

    def console(msg: Any) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            session.problems.append(f"CSP: {msg.text}")

    page.on("console", console)
    try:
        yield session
    finally:
        context.close()
    assert session.requests, "the page made no request at all"
    assert not session.foreign_requests(), session.foreign_requests()
    assert not session.problems, session.problems
