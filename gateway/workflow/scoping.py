"""What an API client limited to programs (``clients create --program``) may see.

A limited client sees a case of its programs, a FHIR resource of a patient who has such a
case, and an inbound message that reached such a case (a case event records it). Anything
else answers 404, as if it did not exist (a 403 would confirm it does). A client without
``--program`` (``Principal.programs`` None) sees everything, as before.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.clients.service import Principal
from gateway.db.models import Case, CaseEvent


async def patient_visible(
    session: AsyncSession, principal: Principal, patient_id: str | None
) -> bool:
    """True if ``principal`` may see data of patient ``patient_id`` (None: data of no
    patient, which a limited client does not see)."""
    if principal.programs is None:
        return True
    if patient_id is None:
        return False
    found = await session.scalar(
        select(Case.id)
        .where(Case.patient_id == patient_id, Case.program.in_(sorted(principal.programs)))
        .limit(1)
    )
    return found is not None


async def message_visible(session: AsyncSession, principal: Principal, message_id: str) -> bool:
    """True if ``principal`` may see inbound message ``message_id``: it reached a case of
    one of its programs."""
    if principal.programs is None:
        return True
    found = await session.scalar(
        select(CaseEvent.id)
        .join(Case, Case.id == CaseEvent.case_id)
        .where(
            CaseEvent.inbound_message_id == message_id,
            Case.program.in_(sorted(principal.programs)),
        )
        .limit(1)
    )
    return found is not None
