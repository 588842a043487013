"""`prvng login|logout|whoami`, `prvng user|role|apikey|audit|keys …`: identity and audit."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioning.cli.output import OutputFormat, console, render
from provisioning.cli.state import CliState, run, state_of
from provisioning.control_center.client import ControlCenterClient
from provisioning.core.errors import OperationFailed, Unauthorized

users_app = typer.Typer(help="Manage users (needs user:manage).", no_args_is_help=True)
roles_app = typer.Typer(help="List roles and assign them to users.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys for scripts: `PRVNG_API_KEY=<key> prvng …`.", no_args_is_help=True
)
audit_app = typer.Typer(help="Search, verify and export the audit log.", no_args_is_help=True)
signing_app = typer.Typer(help="Token signing keys.", no_args_is_help=True)
mfa_app = typer.Typer(help="Two-factor authentication (TOTP).", no_args_is_help=True)

USER_COLUMNS = [
    ("id", "ID"),
    ("username", "USER"),
    ("roles", "ROLES"),
    ("disabled", "DISABLED"),
    ("mfa_enabled", "MFA"),
    ("created_at", "CREATED"),
]
KEY_COLUMNS = [
    ("prefix", "KEY"),
    ("name", "NAME"),
    ("scopes", "SCOPES"),
    ("expires_at", "EXPIRES"),
    ("last_used_at", "LAST USED"),
    ("revoked_at", "REVOKED"),
]
AUDIT_COLUMNS = [
    ("seq", "#"),
    ("ts", "WHEN"),
    ("actor", "WHO"),
    ("action", "ACTION"),
    ("object_type", "TYPE"),
    ("object_id", "OBJECT"),
    ("result", "RESULT"),
    ("source", "FROM"),
]


async def _authed(st: CliState) -> ControlCenterClient:
    token = await st.credentials().bearer_async()
    if token is None:
        raise Unauthorized("not logged in: run `prvng login` (or set PRVNG_API_KEY)")
    return st.cc_client(token)


def _call(ctx: typer.Context, method: str, path: str, body: Any = None, **params: Any) -> Any:
    st = state_of(ctx)

    async def go() -> Any:
        async with await _authed(st) as c:
            if method == "GET":
                return await c.get(path, params)
            if method == "POST":
                return await c.post(path, body)
            if method == "PATCH":
                return await c.patch(path, body)
            return await c.delete(path)

    return run(go())


# ---------------------------------------------------------------------- login


def login(
    ctx: typer.Context,
    username: Annotated[str | None, typer.Option("--username", "-u", help="User name.")] = None,
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input (for scripts).")
    ] = False,
    mfa_code: Annotated[str | None, typer.Option(help="TOTP code, when MFA is enabled.")] = None,
) -> None:
    """Log in to the control center; the login is kept in ~/.config/provisioning/credentials
    (mode 0600) and refreshed automatically."""
    st = state_of(ctx)
    user = username or typer.prompt("Username")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("PRVNG_PASSWORD") or typer.prompt("Password", hide_input=True)

    async def go() -> Any:
        async with st.cc_client() as c:
            try:
                return await c.login(user, password, mfa_code)
            except Unauthorized as exc:
                if exc.details.get("mfa_required") and mfa_code is None and sys.stdin.isatty():
                    code = typer.prompt("MFA code")
                    return await c.login(user, password, code)
                raise

    result = run(go())
    st.credentials().store(result)
    console.print(f"logged in to {st.cc_url()} as {result['user']['username']}", markup=False)


def logout(ctx: typer.Context) -> None:
    """End the stored login (the session is revoked on the server) and forget it."""
    st = state_of(ctx)
    creds = st.credentials()
    entry = creds.entry()
    if entry is None:
        console.print("not logged in")
        return

    async def go() -> None:
        try:
            token = await creds.access_token()
            async with st.cc_client(token) as c:
                await c.logout(str(entry["refresh_token"]))
        except Unauthorized:
            pass  # already ended on the server

    run(go())
    creds.forget()
    console.print("logged out")


def whoami(ctx: typer.Context) -> None:
    """Show who the stored login or PRVNG_API_KEY is."""
    st = state_of(ctx)

    async def go() -> Any:
        async with await _authed(st) as c:
            return await c.whoami()

    render(run(go()), st.output)


# ---------------------------------------------------------------------- users and roles


@users_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """List users."""
    render(_call(ctx, "GET", "/users"), state_of(ctx).output, columns=USER_COLUMNS)


@users_app.command("create")
def user_create(
    ctx: typer.Context,
    username: Annotated[str, typer.Argument(help="a-z 0-9 . _ -, up to 64.")],
    role: Annotated[
        list[str] | None, typer.Option("--role", "-r", help="Role (repeatable).")
    ] = None,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
) -> None:
    """Create a user (8-1,024 characters of password; common passwords are refused)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt(
            "Password for the new user", hide_input=True, confirmation_prompt=True
        )
    doc = _call(
        ctx, "POST", "/users", {"username": username, "password": password, "roles": role or []}
    )
    render(doc, state_of(ctx).output)


@users_app.command("show")
def user_show(ctx: typer.Context, user: Annotated[str, typer.Argument(help="Name or id.")]) -> None:
    """Show a user."""
    render(_call(ctx, "GET", f"/users/{user}"), state_of(ctx).output)


@users_app.command("disable")
def user_disable(
    ctx: typer.Context, user: Annotated[str, typer.Argument(help="Name or id.")]
) -> None:
    """Disable a user: their sessions and API keys stop working at once."""
    render(_call(ctx, "PATCH", f"/users/{user}", {"disabled": True}), state_of(ctx).output)


@users_app.command("enable")
def user_enable(
    ctx: typer.Context, user: Annotated[str, typer.Argument(help="Name or id.")]
) -> None:
    """Enable a disabled user (they log in again)."""
    render(_call(ctx, "PATCH", f"/users/{user}", {"disabled": False}), state_of(ctx).output)


@roles_app.command("list")
def role_list(ctx: typer.Context) -> None:
    """List the roles and the actions each allows."""
    st = state_of(ctx)
    data = _call(ctx, "GET", "/roles")
    if st.output is OutputFormat.TABLE:
        data = [{**r, "actions": ", ".join(r["actions"])} for r in data]
    render(
        data,
        st.output,
        columns=[("name", "ROLE"), ("description", "DESCRIPTION"), ("actions", "ACTIONS")],
    )


def _set_roles(ctx: typer.Context, user: str, add: str | None, remove: str | None) -> None:
    current = _call(ctx, "GET", f"/users/{user}")["roles"]
    roles = sorted((set(current) | ({add} if add else set())) - ({remove} if remove else set()))
    render(_call(ctx, "PATCH", f"/users/{user}", {"roles": roles}), state_of(ctx).output)


@roles_app.command("assign")
def role_assign(ctx: typer.Context, user: str, role: str) -> None:
    """Give USER the ROLE."""
    _set_roles(ctx, user, role, None)


@roles_app.command("unassign")
def role_unassign(ctx: typer.Context, user: str, role: str) -> None:
    """Take ROLE from USER."""
    _set_roles(ctx, user, None, role)


# ---------------------------------------------------------------------- API keys


@keys_app.command("create")
def apikey_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the key is for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help="Allowed action (repeatable); none: all yours."),
    ] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expiry in days.")] = None,
) -> None:
    """Create an API key. The key is printed once: store it now."""
    st = state_of(ctx)
    doc = _call(
        ctx,
        "POST",
        "/apikeys",
        {"name": name, "scopes": scope or [], "expires_in_days": expires_in_days},
    )
    if st.output is OutputFormat.TABLE:
        console.print(
            f"API key {doc['prefix']} ({name}) created. The key, shown only now:", markup=False
        )
        print(doc["key"], flush=True)
    else:
        render(doc, st.output)


@keys_app.command("list")
def apikey_list(
    ctx: typer.Context,
    all_users: Annotated[
        bool, typer.Option("--all", help="Everybody's keys (apikey:admin).")
    ] = False,
) -> None:
    """List API keys by prefix (never the secret)."""
    render(
        _call(ctx, "GET", "/apikeys", all_users=all_users or None),
        state_of(ctx).output,
        columns=KEY_COLUMNS,
    )


@keys_app.command("revoke")
def apikey_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="Key id (the part after prvng_).")],
) -> None:
    """Revoke an API key: it stops working at once."""
    render(_call(ctx, "DELETE", f"/apikeys/{key_id.removeprefix('prvng_')}"), state_of(ctx).output)


# ---------------------------------------------------------------------- audit


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    actor: Annotated[str | None, typer.Option(help="Who.")] = None,
    action: Annotated[
        str | None, typer.Option(help="Action, e.g. auth:login or workflow:*.")
    ] = None,
    result: Annotated[str | None, typer.Option(help="success, denied, failure or error.")] = None,
    service: Annotated[
        str | None, typer.Option(help="Service that recorded it, e.g. orchestrator.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="From this time (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Search the audit log (oldest first)."""
    data = _call(
        ctx,
        "GET",
        "/audit",
        actor=actor,
        action=action,
        result=result,
        service=service,
        since=since,
        limit=limit,
        offset=offset,
    )
    render(data, state_of(ctx).output, columns=AUDIT_COLUMNS)


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    repo: Annotated[
        Path | None,
        typer.Option(
            "--repo",
            help="Verify an audit-mirror git repository instead: every commit's SSH signature, "
            "unbroken history, canonical events, and the signed external checkpoint.",
        ),
    ] = None,
    allowed_signers: Annotated[
        Path | None,
        typer.Option(help="With --repo: the mirror's allowed-signers file."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="With --repo: the mirror's checkpoint file (outside the repository)."),
    ] = None,
    mirror: Annotated[
        bool,
        typer.Option(
            "--mirror",
            help="Verify this data dir's audit-mirror repository (audit_mirror.repo, with the "
            "allowed signers and checkpoint of audit_mirror.state_dir).",
        ),
    ] = False,
) -> None:
    """Check the control center's hash chain (exit 1 when a record was edited, deleted or
    reordered), or an audit-mirror repository: --mirror for the platform's own, --repo for
    any (e.g. a pushed copy, with the trust files kept apart from it)."""
    if mirror and repo is None:
        from provisioning.audit_mirror.app import mirror_paths

        repo, state_dir = mirror_paths(state_of(ctx).settings())
        allowed_signers = allowed_signers or state_dir / "allowed_signers"
        checkpoint = checkpoint or state_dir / "checkpoint.json"
    if repo is not None:
        from provisioning.cli.commands.audit_mirror_cli import verify_repo_command

        verify_repo_command(repo, allowed_signers, checkpoint)
        return
    st = state_of(ctx)
    res = _call(ctx, "GET", "/audit/verify")
    render(res, st.output)
    if not res["ok"]:
        raise OperationFailed(
            f"audit chain broken at record {res['first_bad_seq']}: {res['reason']}"
        )


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="From this time (ISO 8601).")] = None,
) -> None:
    """Write the audit log as JSON lines to standard output."""
    sys.stdout.write(_call(ctx, "GET", "/audit/export", since=since))


@mfa_app.command("enroll")
def mfa_enroll(
    ctx: typer.Context,
    code: Annotated[str | None, typer.Option(help="The code from the app (else asked).")] = None,
) -> None:
    """Enable TOTP for your user: add the secret to an authenticator app, then confirm a code."""
    secret = _call(ctx, "POST", "/auth/mfa/enroll")
    console.print("Add this to your authenticator app:", markup=False)
    console.print(f"  secret  {secret['secret']}\n  uri     {secret['uri']}", markup=False)
    answer = code or typer.prompt("Code shown by the app")
    _call(ctx, "POST", "/auth/mfa/confirm", {"code": answer})
    console.print("MFA enabled; log in again with `prvng login` to get an MFA session.")


class SigningService(StrEnum):
    CONTROL_CENTER = "control-center"
    KEEPER = "keeper"


@signing_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    service: Annotated[
        SigningService,
        typer.Option(
            help="Whose key: the control center's (login tokens) or the ops-keeper's "
            "(operation tokens, published in its /.well-known/jwks.json)."
        ),
    ] = SigningService.CONTROL_CENTER,
) -> None:
    """Make a new token signing key; the old one stays valid until its tokens expire.

    The ops-keeper keeps a rotated-out key in its JWKS for
    ops_keeper.key_overlap_s. Needs keys:rotate (admin).

    Example: prvng keys rotate --service keeper
    """
    st = state_of(ctx)
    if service is SigningService.KEEPER:

        async def go() -> dict[str, Any]:
            async with st.keeper_client() as c:
                return await c.rotate_keys()

        doc = run(go())
        keys = len(doc["jwks"]["keys"])
        what = f"new ops-keeper signing key {doc['kid']}; its JWKS now lists {keys} keys"
    else:
        doc = _call(ctx, "POST", "/keys/rotate")
        what = f"new signing key {doc['kid']}"
    if st.output is OutputFormat.TABLE:
        console.print(what, markup=False)
    else:
        render(doc, st.output)


__all__ = [
    "audit_app",
    "keys_app",
    "login",
    "logout",
    "mfa_app",
    "roles_app",
    "signing_app",
    "users_app",
    "whoami",
]
