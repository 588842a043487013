"""A real background platform for end-to-end tests, driven through the `prvng` CLI.

:func:`running_platform` starts `prvng platform start --background` on free 127.0.0.1 ports
with `--data-dir` in a temp dir, logs in as the first-run admin, and stops it (then SIGKILL if
it is still alive). :func:`prvng` runs one command in its own process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import free_port

__all__ = ["REPO", "Platform", "prvng", "running_platform", "show"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Platform:
    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "run" / "platform.pid").read_text("utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            return None


def prvng(
    *args: str,
    data_dir: Path,
    url: str | None = None,
    timeout: float = 120,
    stdin: str = "",
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one `prvng` command in its own process; `url` adds `--url`."""
    argv = [sys.executable, "-m", "provisioning.cli.main", "--data-dir", str(data_dir)]
    if url is not None:
        argv += ["--url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRVNG_")}
    # The login of `prvng login` lives beside the data dir, not in the real home.
    env["XDG_CONFIG_HOME"] = str(data_dir.parent / "config-home")
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
        input=stdin,
    )


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@contextlib.contextmanager
def running_platform(data_dir: Path, *, extra_config: str = "") -> Iterator[Platform]:
    """``extra_config``: a Nickel record merged (``&``) into the ``platform.ncl`` written here,
    e.g. ``{ ops_controller = { embedded = false } }`` (it must not set the ports again)."""
    plat = Platform(data_dir=data_dir, port=free_port())
    # The control center's port, for the platform and every later command of this data dir.
    (data_dir / "config").mkdir(parents=True)
    config = (
        f"{{ control_center = {{ port = {free_port()} }}, nats = {{ port = {free_port()} }}, "
        f"ops_keeper = {{ port = {free_port()} }}, ops_controller = {{ port = {free_port()} }}, "
        f"audit_mirror = {{ port = {free_port()} }} }}"
    )
    if extra_config.strip():
        config = f"{config}\n& ({extra_config.strip()})"
    (data_dir / "config" / "platform.ncl").write_text(config + "\n", encoding="utf-8")
    started = prvng(
        "platform", "start", "--background", "--port", str(plat.port), data_dir=data_dir
    )
    assert started.returncode == 0, show(started)
    assert plat.url in started.stdout, show(started)
    match = re.search(r"user admin created with password (\S+)", started.stdout)
    assert match, show(started)
    logged = prvng(
        "login", "-u", "admin", "--password-stdin", data_dir=data_dir, stdin=match[1] + "\n"
    )
    assert logged.returncode == 0, show(logged)
    try:
        yield plat
    finally:
        pid = plat.pid()
        prvng("platform", "stop", "--timeout", "20", data_dir=data_dir)
        if pid is not None and psutil.pid_exists(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
