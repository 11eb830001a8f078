"""Who is acting: the agent the audit trail records for the work in hand.

A request authenticated with an API key acts as that client, from the peer's network
address (:func:`gateway.deps.require_scope` sets it); a CLI command acts as the operating
system user who ran it (``cli:<user>``); a worker loop as the system (``worker``). The
actor is a context variable, so a service several calls down records the right agent
without every signature carrying it, and an ``asyncio`` task started by a request (the
events applied after the acknowledgement) keeps its request's actor.
"""

from __future__ import annotations

import contextlib
import getpass
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

AgentKind = Literal["client", "user", "system"]


@dataclass(frozen=True)
class Actor:
    """An audit agent: ``kind``, a ``name`` (client name, ``cli:<user>``, ``worker``),
    the API client's id, and the network address the request came from."""

    kind: AgentKind
    name: str
    client_id: int | None = None
    address: str | None = None


#: The system itself (worker loops, start-up): the default.
SYSTEM = Actor("system", "worker")

_current: ContextVar[Actor] = ContextVar("gateway_actor", default=SYSTEM)


def current_actor() -> Actor:
    """The actor of the work in hand (:data:`SYSTEM` when nobody set one)."""
    return _current.get()


def set_actor(actor: Actor) -> None:
    """Act as ``actor`` for the rest of the current task (a request)."""
    _current.set(actor)


@contextlib.contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Act as ``actor`` inside the block."""
    token = _current.set(actor)
    try:
        yield actor
    finally:
        _current.reset(token)


def cli_actor() -> Actor:
    """The operating system user running a CLI command, as ``cli:<user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor("user", f"cli:{user}"[:128])
