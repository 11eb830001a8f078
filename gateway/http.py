"""The request toolkit of every channel that takes a body: decoding, the content-type
check, the guarded run that keeps a refused payload for review, the answer, and storing an
inbound message once.

* :func:`decode_json_object`: UTF-8 JSON that must be an object, with every way it can fail
  (bad encoding, bad syntax, nesting too deep, an integer too long for Python to convert,
  a NUL character PostgreSQL cannot store) answered as a problem, never a 500;
* :func:`request_content_type`, :func:`require_json`: the declared media type;
* :func:`run_guarded`: run a channel's call; a refused payload (400, 409, 415, 422) is
  kept whole in the exceptions queue (:func:`record_refusal`), in its own transaction (a
  body over the size limit never gets here: the app's body limit answers 413 without
  reading past the limit, keeps none of it and logs ``http.body_too_large``);
* :class:`Outcome`: the status and JSON body a channel answers with;
* :func:`store_if_new`: ``INSERT ... ON CONFLICT (dedupe_key) DO NOTHING`` of an inbox row,
  so the database settles which of two copies of one message arriving at once is stored;
* :func:`document_body`: the OpenAPI request body of a route that reads its body raw.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from gateway.db.bulk import insert_ignore
from gateway.db.models import InboundMessage
from gateway.db.types import utcnow
from gateway.errors import (
    BadRequestError,
    GatewayError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from gateway.inbox import repository as inbox
from gateway.logging import get_logger
from gateway.runtime import Runtime
from mappers.errors import Problem

log = get_logger(__name__)

#: The longest integer a body may hold, in digits: CPython refuses to convert longer
#: decimal strings (``sys.get_int_max_str_digits()``, CVE-2020-10735), and the gateway
#: has no field that needs one.
MAX_INT_DIGITS = 4300

#: Refusals whose payload is kept for review (the sender's data, not its credentials). Not
#: 413: an oversize body is refused before it is read whole, and is not kept.
REVIEWED_STATUSES = frozenset({400, 409, 415, 422})


class _NumberTooLongError(ValueError):
    """An integer literal longer than :data:`MAX_INT_DIGITS` digits."""


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise _NumberTooLongError
    return int(text)


#: At most this many NUL locations are listed in one refusal.
MAX_NUL_PROBLEMS = 20


def _nul_locations(data: Any) -> list[str]:
    """The locations (``answers.current_medications``, ``consents[0].type``) of the
    strings in decoded JSON that hold U+0000, in document order; a key holding one is
    reported at its object. Walked without recursion: the nesting may be as deep as the
    parser allowed."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack and len(found) < MAX_NUL_PROBLEMS:
        location, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                found.append(location)
        elif isinstance(item, dict):
            children: list[tuple[str, Any]] = []
            for key, value in item.items():
                if "\x00" in key:
                    found.append(location)
                    continue
                children.append((f"{location}.{key}" if location else key, value))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend((f"{location}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return found


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object (RFC 8259).

    Args:
        raw: the body as received.

    Returns:
        The object.

    Raises:
        BadRequestError: not UTF-8 (``invalid_encoding``), not JSON (``invalid_json``,
            naming line and column), or nested too deeply to parse.
        UnprocessableError: valid JSON that is not an object (``type_error``), holding
            an integer of more than :data:`MAX_INT_DIGITS` digits (``number_too_long``;
            RFC 8259 section 6 lets a parser limit numbers), or a string with a NUL
            character, ``\\u0000`` (``invalid_character`` at each string holding
            one: no field needs one, and PostgreSQL cannot store one in text or JSON).
    """
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except UnicodeDecodeError as exc:
        raise BadRequestError(
            "the body is not UTF-8",
            [Problem("", "invalid_encoding", "the body must be UTF-8 JSON")],
        ) from exc
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            "the body is not valid JSON",
            [Problem("", "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}")],
        ) from exc
    except _NumberTooLongError as exc:
        raise UnprocessableError(
            "the body holds a number that is too long",
            [Problem("", "number_too_long", f"integers have at most {MAX_INT_DIGITS} digits")],
        ) from exc
    except RecursionError as exc:
        # json.loads recurses once per nesting level; a small body can exhaust the stack.
        raise BadRequestError(
            "the body is not valid JSON",
            [Problem("", "invalid_json", "arrays or objects are nested too deeply")],
        ) from exc
    if not isinstance(data, dict):
        raise UnprocessableError(
            "the body must be a JSON object", [Problem("", "type_error", "expected a JSON object")]
        )
    nul_at = _nul_locations(data) if b"\\u0000" in raw else []
    if nul_at:
        raise UnprocessableError(
            "the body holds a NUL character",
            [Problem(at, "invalid_character", "contains a NUL character") for at in nul_at],
        )
    return data


def request_content_type(request: Request) -> str:
    """The request's declared content type (JSON when absent)."""
    return request.headers.get("content-type", "application/json")


def require_json(content_type: str) -> None:
    """Refuse a body that is declared as something other than JSON (``application/json``
    or any ``+json`` type, such as ``application/fhir+json``).

    Raises:
        UnsupportedMediaTypeError: 415 with the problem listed.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            "send JSON (Content-Type: application/json)",
            [Problem("", "unsupported_media_type", "the body must be application/json")],
        )


@dataclass
class Outcome:
    """A channel's answer: HTTP status, JSON body, and the inbox id of the message."""

    status_code: int
    body: dict[str, Any]
    message_id: str | None = None


async def record_refusal(
    runtime: Runtime,
    *,
    channel: str,
    sender: str | None,
    error: GatewayError,
    payload: bytes,
    content_type: str | None,
) -> int:
    """Keep a refused payload for review (``rejected_input`` in the exceptions queue), in
    its own transaction: the request's own transaction is rolled back, so nothing of the
    refused message is half written. Repeated refusals of one sender for one reason are
    one exception with a count, each payload kept
    (:func:`gateway.inbox.repository.record_grouped_refusal`).

    Returns:
        The exceptions-queue id.
    """
    problems = error.problems or [Problem("", error.slug, error.detail)]
    async with runtime.write_session() as session:
        record, seq = await inbox.record_grouped_refusal(
            session,
            channel=channel,
            sender=sender,
            status=error.status,
            problems=problems,
            payload=payload,
            content_type=content_type,
        )
        await session.commit()
    log.info(
        "ingest.rejected",
        channel=channel,
        exception_id=record.id,
        occurrence=seq,
        status_code=error.status,
        problems=len(problems),
    )
    return record.id


OutcomeT = TypeVar("OutcomeT", bound=Outcome)


async def run_guarded(
    request: Request,
    session: AsyncSession,
    runtime: Runtime,
    *,
    channel: str,
    sender: str | None,
    raw: bytes,
    call: Callable[[], Awaitable[OutcomeT]],
    json_only: bool = True,
) -> OutcomeT:
    """Run a channel's ``call`` on a request body; keep a refused payload for review.

    Args:
        request: the request (its content type).
        session: the request's session, rolled back before a refusal is recorded.
        runtime: the wired runtime (the refusal's own transaction).
        channel: the inbox channel, for the exceptions queue.
        sender: who sent it (API client, partner, target).
        raw: the body as received.
        call: the channel's work.
        json_only: refuse a body declared as anything but JSON first (415).

    Returns:
        What ``call`` answers.

    Raises:
        GatewayError: what ``call`` or the content-type check raised; for a status in
            :data:`REVIEWED_STATUSES` the payload was recorded first.
    """
    try:
        if json_only:
            require_json(request_content_type(request))
        return await call()
    except GatewayError as exc:
        await session.rollback()
        if exc.status in REVIEWED_STATUSES:
            await record_refusal(
                runtime,
                channel=channel,
                sender=sender,
                error=exc,
                payload=raw,
                content_type=request.headers.get("content-type"),
            )
        raise


async def store_if_new(
    session: AsyncSession, message: InboundMessage, *, alone: bool = False
) -> InboundMessage | None:
    """Insert ``message`` (fully built: status, response...) unless a message with its
    dedupe key exists: one ``INSERT ... ON CONFLICT (dedupe_key) DO NOTHING RETURNING``
    (SQLite 3.35+ and PostgreSQL). On PostgreSQL a copy that arrives while the first is
    being stored waits for the first transaction, then finds its row; the database, not
    a retry, settles the race.

    The row is written with a Core insert: ``message`` itself stays outside the session
    and is not updated by later flushes.

    Args:
        alone: the row is all the caller writes (an acknowledged event: nothing else
            commits or rolls back with it). On PostgreSQL it is then sent as one
            autocommit statement on a pooled connection of its own: one round trip
            instead of three (``BEGIN``, the ``INSERT``, ``COMMIT``), and the row is
            committed when this returns. On SQLite it joins the session's transaction.

    Returns:
        None when stored; the existing message when the key was taken (a retransmission).

    Raises:
        UnprocessableError: an identifier (the sender's message id, the sender, the
            content type) longer than its column (``too_long``).
    """
    table = InboundMessage.__table__
    for column in ("external_id", "sender", "dedupe_key", "content_type"):
        value, limit = getattr(message, column), getattr(table.c[column].type, "length", None)
        if isinstance(value, str) and limit is not None and len(value) > limit:
            # PostgreSQL refuses a longer value (a 500); SQLite would keep it
            raise UnprocessableError(
                "an identifier of the message is too long",
                [Problem("", "too_long", f"{column} has at most {limit} characters")],
                in_body=False,
            )
    message.received_at = message.received_at or utcnow()
    # None values are left out so the columns' defaults apply (status, revision...)
    values: dict[str, Any] = {
        c.key: getattr(message, c.key) for c in table.columns if getattr(message, c.key) is not None
    }
    stmt = (
        insert_ignore(session, InboundMessage)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(InboundMessage.id)
    )
    # RETURNING tells whether the row was written (rowcount is not reliable here).
    engine = session.bind
    if alone and isinstance(engine, AsyncEngine) and engine.dialect.name == "postgresql":
        async with engine.connect() as own:
            await own.execution_options(isolation_level="AUTOCOMMIT")
            if (await own.execute(stmt)).scalar_one_or_none() is not None:
                return None
    elif (await session.execute(stmt)).scalar_one_or_none() is not None:
        return None
    return await inbox.get_message_by_key(session, message.dedupe_key)


#: Request models documented in the OpenAPI components (bodies are read raw so that a
#: refused payload can be kept whole for review).
DOCUMENTED_MODELS: list[type[BaseModel]] = []


def document_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body."""
    DOCUMENTED_MODELS.append(model)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
