"""The `prvng` command: global flags, sub-commands, errors turned into exit codes.

Exit codes (DESIGN §9): 0 ok, 1 operation failed, 2 usage error, 3 not reachable / not
authorised.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.text import Text

from provisioning import __version__
from provisioning.cli.commands import (
    config,
    dns,
    domain,
    identity,
    ops,
    platform,
    provision,
    serve,
    system,
    task,
    workflow,
)
from provisioning.cli.output import OutputFormat, err_console
from provisioning.cli.state import CliState
from provisioning.core.errors import NickelError, ProvisioningError

__all__ = ["app", "main"]

app = typer.Typer(
    name="prvng",
    help="Provisioning platform: run workflows, manage the platform and its services.\n\n"
    "Start with `prvng platform start` (or `make run`), then "
    "`prvng workflow submit examples/workflows/hello.ncl --wait`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(platform.app, name="platform")
app.add_typer(serve.app, name="serve")
app.add_typer(workflow.app, name="workflow")
app.add_typer(task.app, name="task")
app.add_typer(domain.workspace_app, name="workspace")
app.add_typer(domain.component_app, name="component")
app.add_typer(domain.extension_app, name="extension")
app.add_typer(provision.server_app, name="server")
app.add_typer(provision.taskserv_app, name="taskserv")
app.add_typer(provision.cluster_app, name="cluster")
app.add_typer(provision.batch_app, name="batch")
app.add_typer(ops.app, name="ops")
app.add_typer(system.app, name="system")
app.command("login")(identity.login)
app.command("logout")(identity.logout)
app.command("whoami")(identity.whoami)
app.add_typer(identity.users_app, name="user")
app.add_typer(identity.roles_app, name="role")
app.add_typer(identity.keys_app, name="apikey")
app.add_typer(identity.audit_app, name="audit")
app.add_typer(identity.signing_app, name="keys")
app.add_typer(identity.mfa_app, name="mfa")
app.add_typer(config.app, name="config")
app.add_typer(dns.app, name="dns")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prvng {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--output", "-o", help="Output format of listings.", envvar="PRVNG_OUTPUT_FORMAT"
        ),
    ] = OutputFormat.TABLE,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Orchestrator URL; default from the settings (http://127.0.0.1:8080).",
            envvar="PRVNG_URL",
        ),
    ] = None,
    cc: Annotated[
        str | None,
        typer.Option(
            "--cc-url",
            help="Control center URL; default from the running platform or the settings "
            "(http://127.0.0.1:8081).",
            envvar="PRVNG_CONTROL_CENTER_URL",
        ),
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Platform data dir (default ~/.local/share/provisioning).",
            envvar="PRVNG_HOME",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = CliState(output=output, url=url, home=home, cc=cc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prvng` console script."""
    try:
        code = app(args=argv, prog_name="prvng", standalone_mode=False)
    except ProvisioningError as exc:
        if (
            isinstance(exc, NickelError)
            and exc.details.get("diagnostic_ansi")
            and sys.stderr.isatty()
        ):
            sys.stderr.write(str(exc.details["diagnostic_ansi"]) + "\n")
        else:
            # soft_wrap: no hard line breaks inside paths and diagnostics when stderr is a pipe.
            err_console.print(
                Text.assemble(("error", "bold red"), f" [{exc.code}]: {exc.message}"),
                highlight=False,
                soft_wrap=True,
            )
        return exc.exit_code
    except _EXIT as exc:
        return int(exc.exit_code)
    except _ABORT:
        err_console.print("aborted")
        return 1
    except _USAGE as exc:  # unknown command or option, missing argument, bad value: 2
        if isinstance(exc, click.ClickException) or hasattr(exc, "show"):
            exc.show()  # usage line, hint and the error, as Click prints them
        else:
            err_console.print(f"Error: {exc.format_message()}", highlight=False, markup=False)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    # Without standalone mode, Typer answers the code of an Exit raised in a command (and a
    # command's own return value otherwise: commands return None, their codes go by Exit).
    return code if type(code) is int else 0


# Typer >= 0.29 carries its own copy of Click (typer._click): its exceptions are not Click's.
# Both are caught, so that a usage error is a message and exit code 2, never a traceback.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, typer.TyperException)


if __name__ == "__main__":
    sys.exit(main())
