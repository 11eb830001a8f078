"""Response models of the import routes, and the NDJSON line of a refused record."""

from __future__ import annotations

import json
from datetime import datetime

from pydantic import BaseModel, Field

from gateway.db.models import ImportRefusal


class ImportCounts(BaseModel):
    """What an import did with its records so far."""

    read: int = Field(description="Records read from the files.")
    mapped: int = Field(description="Stored through their channel (new or corrected).")
    refused: int = Field(description="Did not validate or map: see refusals.")
    duplicate: int = Field(description="Seen before (same business id and content).")
    delivered: int = Field(description="EHR deliveries of the job's records delivered.")
    shadowed: int = Field(description="EHR deliveries compared by a target in shadow mode.")
    deliveries_pending: int = Field(description="EHR deliveries still waiting.")
    suppressed_webhooks: int = Field(
        description="Ops webhooks of historical case changes recorded, not sent."
    )


class ImportFileOut(BaseModel):
    """One file of a job and its cursor."""

    name: str
    size_bytes: int
    cursor: int = Field(description="Bytes committed so far (where a resume starts).")
    status: str


class ImportJobOut(BaseModel):
    """An import job."""

    id: str
    source: str
    notify: bool
    status: str = Field(description="running | completed | failed")
    csv_profile: str | None
    counts: ImportCounts
    files: list[ImportFileOut]
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    refusals_url: str


def refusal_line(row: ImportRefusal) -> str:
    """One refused record as an NDJSON line: where it was, its business id, its
    problems, and the record itself (to fix and import again)."""
    try:
        record: object = json.loads(row.record)
    except ValueError:
        record = row.record.decode("utf-8", "replace")
    return json.dumps(
        {
            "file": row.file,
            "line": row.line,
            "kind": row.kind,
            "business_id": row.business_id,
            "problems": row.problems,
            "record": record,
        },
        separators=(",", ":"),
    )
