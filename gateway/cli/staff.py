"""``fhir-gateway staff create|list|disable|enable|password|role``: the people who sign in
to the ops console (``/console``), with a role: ``viewer``, ``operator`` or ``admin``.

Passwords are read from a hidden prompt (asked twice), or from the first line of standard
input with ``--password-stdin`` (scripts); they are stored as argon2id hashes. Every
change is recorded in the audit trail as the operating system user who ran the command.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gateway.cli.common import Database, fail, run_on_database

app = typer.Typer(help="Staff accounts of the ops console (/console).", no_args_is_help=True)

_PASSWORD_STDIN = typer.Option(
    "--password-stdin", help="Read the password from the first line of standard input"
)


def _password(from_stdin: bool) -> str:
    from gateway.staff.service import StaffError, check_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        check_password(password)
    except StaffError as exc:
        raise fail(str(exc)) from exc
    return password


@app.command("create")
def staff_create(
    username: Annotated[str, typer.Argument(help="Sign-in name, e.g. alice")],
    role: Annotated[str, typer.Option("--role", "-r", help="viewer | operator | admin")] = "viewer",
    name: Annotated[str | None, typer.Option("--name", help="Display name")] = None,
    password_stdin: Annotated[bool, _PASSWORD_STDIN] = False,
) -> None:
    """Create a staff account (its password is asked for, hidden, twice)."""
    from gateway.audit import service as audit
    from gateway.db.types import utcnow
    from gateway.staff.service import StaffError, create_staff

    password = _password(password_stdin)

    async def work(db: Database) -> None:
        async with db.session() as session:
            user = await create_staff(
                session,
                username=username,
                password=password,
                role=role,
                display_name=name,
                now=utcnow(),
            )
            audit.record(
                session,
                action="create",
                entity_type="StaffUser",
                entity_id=str(user.id),
                detail={"username": username, "role": role},
            )
            await session.commit()

    try:
        run_on_database(work)
    except StaffError as exc:
        raise fail(str(exc)) from exc
    typer.echo(f"staff user {username!r} created with the role {role}")


@app.command("list")
def staff_list() -> None:
    """List staff accounts: username, role, state, last sign-in (never a password)."""
    from gateway.db.models import StaffUser
    from gateway.staff.service import list_staff

    async def work(db: Database) -> list[StaffUser]:
        async with db.session() as session:
            return await list_staff(session)

    for u in run_on_database(work):
        state = "active" if u.active else "disabled"
        last = u.last_login_at.isoformat() if u.last_login_at else "-"
        typer.echo("\t".join([u.username, u.role, state, last, u.display_name or ""]))


def _set_active(username: str, active: bool) -> None:
    from gateway.audit import service as audit
    from gateway.staff.service import StaffError, set_active

    async def work(db: Database) -> None:
        async with db.session() as session:
            user = await set_active(session, username=username, active=active)
            audit.record(
                session,
                action="update" if active else "deactivate",
                entity_type="StaffUser",
                entity_id=str(user.id),
            )
            await session.commit()

    try:
        run_on_database(work)
    except StaffError as exc:
        raise fail(str(exc), code=1) from exc


@app.command("disable")
def staff_disable(username: Annotated[str, typer.Argument()]) -> None:
    """Disable an account: it cannot sign in, and its sessions end now."""
    _set_active(username, False)
    typer.echo(f"staff user {username!r} disabled")


@app.command("enable")
def staff_enable(username: Annotated[str, typer.Argument()]) -> None:
    """Enable a disabled account again."""
    _set_active(username, True)
    typer.echo(f"staff user {username!r} enabled")


@app.command("password")
def staff_password(
    username: Annotated[str, typer.Argument()],
    password_stdin: Annotated[bool, _PASSWORD_STDIN] = False,
) -> None:
    """Set a new password (asked for, hidden, twice); the account's sessions end."""
    from gateway.audit import service as audit
    from gateway.db.types import utcnow
    from gateway.staff.service import StaffError, set_password

    password = _password(password_stdin)

    async def work(db: Database) -> None:
        async with db.session() as session:
            user = await set_password(session, username=username, password=password, now=utcnow())
            audit.record(
                session,
                action="update",
                entity_type="StaffUser",
                entity_id=str(user.id),
                detail={"password": "changed"},
            )
            await session.commit()

    try:
        run_on_database(work)
    except StaffError as exc:
        raise fail(str(exc), code=1) from exc
    typer.echo(f"password of {username!r} changed")


@app.command("role")
def staff_role(
    username: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Argument(help="viewer | operator | admin")],
) -> None:
    """Change an account's role."""
    from gateway.audit import service as audit
    from gateway.staff.service import StaffError, set_role

    async def work(db: Database) -> None:
        async with db.session() as session:
            user = await set_role(session, username=username, role=role)
            audit.record(
                session,
                action="update",
                entity_type="StaffUser",
                entity_id=str(user.id),
                detail={"role": role},
            )
            await session.commit()

    try:
        run_on_database(work)
    except StaffError as exc:
        raise fail(str(exc), code=1) from exc
    typer.echo(f"staff user {username!r} is now {role}")
