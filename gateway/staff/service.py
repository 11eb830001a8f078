"""Staff accounts and their console sessions.

A staff user signs in to ``/console`` with a username and password; the password is kept
as an argon2id hash (``argon2-cffi``'s :class:`~argon2.PasswordHasher`, its default
parameters, RFC 9106). A session is held server-side: the cookie carries 32 random bytes
(URL-safe base64), the table holds their SHA-256 (a leaked table opens no session), the
CSRF token of its forms and when it was last used; it ends on sign-out, when the account
is disabled or its password changed, or after ``idle`` without a request.

Errors::

    StaffError                 a staff account operation was refused
     ├── DuplicateStaffError   the username is taken
     ├── NoSuchStaffError      no such username
     └── InvalidStaffError     a bad username, role or password
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.db.models import StaffRole, StaffSession, StaffUser

#: Usernames: lower-case letters, digits, ``.``, ``_``, ``-`` (1 to 64).
USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: The shortest password accepted (NIST SP 800-63B section 5.1.1.2: at least 8).
MIN_PASSWORD_LENGTH = 12
#: Roles in increasing order of power.
ROLES: tuple[str, ...] = (StaffRole.VIEWER, StaffRole.OPERATOR, StaffRole.ADMIN)

_hasher = PasswordHasher()
#: A hash to verify against when the username is unknown, so that a wrong username and a
#: wrong password take the same time.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class StaffError(ValueError):
    """A staff account operation was refused."""


class DuplicateStaffError(StaffError):
    """The username is taken."""


class NoSuchStaffError(StaffError):
    """No staff user has this username."""


class InvalidStaffError(StaffError):
    """A bad username, role or password."""


def role_at_least(role: str, needed: str) -> bool:
    """True if ``role`` grants what ``needed`` grants (``admin`` >= ``operator`` >=
    ``viewer``); an unknown role grants nothing."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


def check_password(password: str) -> None:
    """Raise :class:`InvalidStaffError` for a password under :data:`MIN_PASSWORD_LENGTH`
    characters or over 1024."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= 1024:
        raise InvalidStaffError(f"a password has {MIN_PASSWORD_LENGTH} to 1024 characters")


def _check(username: str, role: str) -> None:
    if not USERNAME_PATTERN.match(username):
        raise InvalidStaffError("a username is 1 to 64 of a-z 0-9 . _ - (starting a-z or 0-9)")
    if role not in ROLES:
        raise InvalidStaffError(f"the role is one of {', '.join(ROLES)}")


async def get_staff(session: AsyncSession, username: str) -> StaffUser | None:
    """The staff user named ``username``, or None."""
    return await session.scalar(select(StaffUser).where(StaffUser.username == username))


async def get_staff_or_raise(session: AsyncSession, username: str) -> StaffUser:
    """The staff user named ``username``.

    Raises:
        NoSuchStaffError: no such user.
    """
    user = await get_staff(session, username)
    if user is None:
        raise NoSuchStaffError(f"no staff user {username!r}")
    return user


async def create_staff(
    session: AsyncSession,
    *,
    username: str,
    password: str,
    role: str,
    display_name: str | None = None,
    now: datetime,
) -> StaffUser:
    """Add a staff user (flushed).

    Raises:
        InvalidStaffError: bad username, role or password.
        DuplicateStaffError: the username is taken.
    """
    _check(username, role)
    check_password(password)
    if await get_staff(session, username) is not None:
        raise DuplicateStaffError(f"the username {username!r} is taken")
    user = StaffUser(
        username=username,
        display_name=display_name,
        password_hash=_hasher.hash(password),
        role=role,
        active=True,
        created_at=now,
        password_changed_at=now,
    )
    session.add(user)
    await session.flush()
    return user


async def list_staff(session: AsyncSession) -> list[StaffUser]:
    """Every staff user, by username."""
    return list(await session.scalars(select(StaffUser).order_by(StaffUser.username)))


async def set_active(session: AsyncSession, *, username: str, active: bool) -> StaffUser:
    """Enable or disable an account; disabling ends its sessions.

    Raises:
        NoSuchStaffError: no such user.
    """
    user = await get_staff_or_raise(session, username)
    user.active = active
    if not active:
        await session.execute(delete(StaffSession).where(StaffSession.staff_id == user.id))
    await session.flush()
    return user


async def set_password(
    session: AsyncSession, *, username: str, password: str, now: datetime
) -> StaffUser:
    """Change a password; every session of the account ends.

    Raises:
        NoSuchStaffError: no such user.
        InvalidStaffError: the password is too short or too long.
    """
    check_password(password)
    user = await get_staff_or_raise(session, username)
    user.password_hash = _hasher.hash(password)
    user.password_changed_at = now
    await session.execute(delete(StaffSession).where(StaffSession.staff_id == user.id))
    await session.flush()
    return user


async def set_role(session: AsyncSession, *, username: str, role: str) -> StaffUser:
    """Change an account's role.

    Raises:
        NoSuchStaffError, InvalidStaffError.
    """
    _check(username, role)
    user = await get_staff_or_raise(session, username)
    user.role = role
    await session.flush()
    return user


async def authenticate(session: AsyncSession, *, username: str, password: str) -> StaffUser | None:
    """The active staff user with this username and password, or None (unknown user,
    disabled account or wrong password take the same argon2 verification). A hash made
    with older parameters is upgraded on the way."""
    user = await get_staff(session, username)
    try:
        _hasher.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


# --------------------------------------------------------------------------- sessions


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    """A console session as a request sees it."""

    session_id: str
    user: StaffUser
    csrf_token: str


async def open_session(
    session: AsyncSession,
    *,
    user: StaffUser,
    now: datetime,
    address: str | None,
    idle: timedelta | None = None,
) -> tuple[str, SignedIn]:
    """Start a console session for ``user``: ``(cookie token, signed-in view)`` (flushed).
    With ``idle``, sessions of anyone left idle longer than that are deleted on the way
    (abandoned sessions do not pile up)."""
    if idle is not None:
        await session.execute(delete(StaffSession).where(StaffSession.last_seen_at < now - idle))
    token = secrets.token_urlsafe(32)
    row = StaffSession(
        id=_digest(token),
        staff_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        address=address[:64] if address else None,
    )
    user.last_login_at = now
    session.add(row)
    await session.flush()
    return token, SignedIn(row.id, user, row.csrf_token)


async def resume_session(
    session: AsyncSession, *, token: str, now: datetime, idle: timedelta, touch: bool = True
) -> SignedIn | None:
    """The session the cookie ``token`` opens, its last use moved to ``now`` (unless not
    ``touch``: a page refreshing itself is not a person using it); None when there is
    none, it has been idle longer than ``idle`` (it is deleted) or its account is
    disabled."""
    row = await session.get(StaffSession, _digest(token))
    if row is None:
        return None
    if row.last_seen_at + idle < now:
        await session.delete(row)
        return None
    user = await session.get(StaffUser, row.staff_id)
    if user is None or not user.active:
        return None
    if touch:
        row.last_seen_at = now
    return SignedIn(row.id, user, row.csrf_token)


async def close_session(session: AsyncSession, *, session_id: str) -> None:
    """End a console session (sign-out)."""
    await session.execute(delete(StaffSession).where(StaffSession.id == session_id))
