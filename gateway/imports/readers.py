"""Reading import files record by record, with the byte offset after each record (the
file's cursor, so an interrupted import resumes where it stopped).

* NDJSON (https://github.com/ndjson/ndjson-spec): one JSON object per line; blank lines
  are skipped. Each object is an intake submission, a canonical checkout, a Stripe
  event or a FHIR resource of a Bulk Data export (:func:`record_kind`).
* CSV (RFC 4180, a header row): each row becomes a record through a CSV import profile
  (:func:`mappers.profiles.imports.csv_row_to_record`).

A record that cannot be read (not JSON, a row that does not map) is yielded with its
problems, to be refused; reading goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.errors import GatewayError
from gateway.http import decode_json_object
from mappers.bulk_fhir import business_id as fhir_business_id
from mappers.bulk_fhir import unsupported_type_problem
from mappers.errors import MappingErrors, Problem
from mappers.profiles.imports import CsvImportProfile, csv_row_to_record

RecordKind = Literal["intake", "checkout", "stripe", "fhir"]


@dataclass
class Record:
    """One record of an import file.

    Attributes:
        line: its first line number in the file (1-based).
        end: the byte offset just after it (the cursor once it is stored).
        raw: the record as the channel takes it (JSON bytes).
        kind: which channel takes it, or None when it cannot be told.
        business_id: its idempotency key (submission id, checkout id, event id).
        problems: why it cannot be imported (then it is refused as read).
    """

    line: int
    end: int
    raw: bytes
    kind: RecordKind | None = None
    business_id: str | None = None
    problems: list[Problem] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex): the same file resumes the same import."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_kind(
    data: dict[str, Any], *, source: str = "legacy"
) -> tuple[RecordKind | None, str | None]:
    """Which channel a JSON record belongs to, and its business id.

    * a Stripe event: ``"object": "event"`` with a ``type`` (its ``id``);
    * a FHIR resource (a Bulk Data export line): a ``resourceType``
      (:func:`mappers.bulk_fhir.business_id`, with the job's ``source``);
    * an intake submission: a ``submission_id``;
    * a canonical checkout: a ``checkout_id``.
    """
    if data.get("object") == "event" and isinstance(data.get("type"), str):
        return "stripe", _text(data.get("id"))
    if "resourceType" in data:
        return "fhir", fhir_business_id(data, source)
    if "submission_id" in data:
        return "intake", _text(data.get("submission_id"))
    if "checkout_id" in data:
        return "checkout", _text(data.get("checkout_id"))
    return None, None


def _text(value: Any) -> str | None:
    return str(value)[:256] if value is not None else None


def _classified(line: int, end: int, raw: bytes, source: str) -> Record:
    record = Record(line=line, end=end, raw=raw)
    try:
        data = decode_json_object(raw)
    except GatewayError as exc:
        record.problems = exc.problems or [Problem("", exc.slug, exc.detail)]
        return record
    record.kind, record.business_id = record_kind(data, source=source)
    if record.kind is None:
        record.problems = [
            Problem(
                "",
                "unknown_record",
                "not an intake submission (submission_id), a canonical checkout "
                "(checkout_id), a Stripe event (object: event) or a FHIR resource "
                "(resourceType)",
            )
        ]
    elif record.kind == "fhir" and (unsupported := unsupported_type_problem(data)):
        record.problems = [unsupported]
    return record


def read_ndjson(
    path: Path,
    *,
    start: int = 0,
    first_line: int = 1,
    source: str = "legacy",
    stop: int | None = None,
) -> Iterator[Record]:
    """The records of an NDJSON file from byte offset ``start`` (a line start).

    Args:
        path: the file.
        start: where to resume (a cursor stored earlier), 0 for the beginning.
        first_line: the line number at ``start``.
        source: the job's source (part of a FHIR resource's business id).
        stop: a line start where this part of the file ends (None: the end).
    """
    with path.open("rb") as handle:
        handle.seek(start)
        offset, line_no = start, first_line
        for line in handle:
            if stop is not None and offset >= stop:
                return
            end = offset + len(line)
            body = line.strip()
            if body:
                yield _classified(line_no, end, body, source)
            offset, line_no = end, line_no + 1


def split_ndjson(path: Path, parts: int) -> list[tuple[int, int]]:
    """Where to cut an NDJSON file into ``parts`` ranges of about equal size, each
    starting at a line start: ``[(byte offset, line number), ...]``, the first
    ``(0, 1)``; fewer when the file has fewer lines than ``parts``.

    One pass over the file (counting newlines in 1 MB chunks), no parsing.
    """
    size = path.stat().st_size
    targets = [size * k // parts for k in range(1, parts)]
    cuts = [(0, 1)]
    offset, line_no = 0, 1
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            position = 0
            while targets:
                newline = chunk.find(b"\n", position)
                if newline < 0:
                    break
                line_start = offset + newline + 1
                line_no += 1
                position = newline + 1
                if line_start >= targets[0] and line_start < size:
                    cuts.append((line_start, line_no))
                    while targets and targets[0] <= line_start:
                        targets.pop(0)
            if not targets:
                break
            line_no += chunk.count(b"\n", position)
            offset += len(chunk)
    return cuts


class _CountingLines:
    """Lines of a binary file decoded as UTF-8, counting the bytes handed out (the csv
    module pulls as many lines as a quoted cell spans)."""

    def __init__(self, handle: io.BufferedReader, offset: int) -> None:
        self.handle = handle
        self.offset = offset
        self.lines = 0
        self.bad_encoding = False  # a line since the last row was not UTF-8

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        self.lines += 1
        encoding = "utf-8-sig" if self.offset == len(line) else "utf-8"
        try:
            return line.decode(encoding)
        except UnicodeDecodeError:  # refused with its row, read on (U+FFFD in the copy)
            self.bad_encoding = True
            return line.decode(encoding, errors="replace")


def read_csv(
    path: Path, profile: CsvImportProfile, *, start: int = 0, first_line: int = 1
) -> Iterator[Record]:
    """The records of a CSV file (header row first) through ``profile``'s column mapping.

    A row that cannot be read is yielded with its problems, to be refused, and reading
    goes on: ``invalid_encoding`` (not UTF-8; the refusal keeps the row with U+FFFD in
    place of the bytes), ``column_count`` (more or fewer cells than the header: an
    unquoted comma would shift every column after it), ``invalid_csv`` (what the csv
    module refuses, e.g. a NUL byte).

    Args:
        path: the file.
        profile: its CSV import profile.
        start: where to resume (a cursor stored earlier; 0: after the header).
        first_line: the line number at ``start``.
    """
    with path.open("rb") as handle:
        lines = _CountingLines(handle, 0)
        header = next(csv.reader(lines), None)
        if header is None:
            return
        if start > lines.offset:
            handle.seek(start)
            lines.offset = start
            line_no = first_line
        else:
            line_no = lines.lines + 1
        lines.lines = 0
        reader = csv.reader(lines)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                first, line_no = line_no, first_line_after(line_no, lines)
                yield _unreadable(first, lines.offset, "invalid_csv", f"not CSV: {exc}", [])
                continue
            first, line_no = line_no, first_line_after(line_no, lines)
            if lines.bad_encoding:
                lines.bad_encoding = False
                message = "the row is not UTF-8 text (save the file as UTF-8)"
                yield _unreadable(first, lines.offset, "invalid_encoding", message, cells)
                continue
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                message = f"{len(cells)} cells, the header has {len(header)} columns"
                yield _unreadable(first, lines.offset, "column_count", message, cells)
                continue
            row = dict(zip(header, cells, strict=True))
            try:
                data = csv_row_to_record(profile, row)
            except MappingErrors as exc:
                raw = json.dumps(row, separators=(",", ":")).encode()
                yield Record(
                    line=first,
                    end=lines.offset,
                    raw=raw,
                    kind=profile.record,
                    problems=exc.problems,
                )
                continue
            raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
            _, business_id = record_kind(data)
            yield Record(
                line=first, end=lines.offset, raw=raw, kind=profile.record, business_id=business_id
            )


def _unreadable(line: int, end: int, code: str, message: str, cells: list[str]) -> Record:
    """A CSV row refused as read: its cells kept (as a JSON array) for the refusal."""
    raw = json.dumps(cells, separators=(",", ":")).encode()
    return Record(line=line, end=end, raw=raw, problems=[Problem("", code, message)])


def first_line_after(line_no: int, lines: _CountingLines) -> int:
    """The line number after a CSV row that spanned ``lines.lines`` lines."""
    taken, lines.lines = lines.lines, 0
    return line_no + taken
