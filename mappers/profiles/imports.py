"""CSV import profiles (``profiles/imports/*.yaml``): how the columns of a legacy CSV export
become the JSON records the live channels take (an intake submission or a canonical
checkout), so a CSV backfill runs through the same profiles, normalizers and patient
matching as live traffic (issue 16).

Example::

    kind: import
    name: legacy-intake-csv
    record: intake                  # intake | checkout
    constants:                      # values every record gets
      form_id: glp1-weight-management
      form_version: 1
    columns:                        # record path <- CSV column
      submission_id: {column: id}
      submitted_at: {column: created}
      patient.first_name: {column: first}
      answers.weight_lb: {column: weight, type: number}
      answers.conditions: {column: conditions, type: list, separator: ";"}

A path is dotted (``patient.address.state``); an empty cell leaves the field out, so
the channel's own validation reports a missing required field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from mappers.errors import MappingErrors, Problem
from mappers.profiles.common import SLUG, Strict

CellType = Literal["string", "number", "integer", "boolean", "list"]

_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})


class Column(Strict):
    """Where one field of the record comes from: a CSV column and how to read its cell."""

    column: str = Field(min_length=1)
    type: CellType = "string"
    separator: str = Field(default=";", min_length=1, description="For type list.")


class CsvImportProfile(Strict):
    """The column mapping of one legacy CSV export."""

    kind: Literal["import"] = "import"
    name: Annotated[str, Field(pattern=SLUG)]
    record: Literal["intake", "checkout"]
    constants: dict[str, Any] = Field(default_factory=dict)
    columns: dict[str, Column]


def _cell(value: str, spec: Column, location: str) -> Any:
    """One cell, read as ``spec.type``.

    Raises:
        MappingErrors: the cell does not read as its type (named by column, not value).
    """
    text = value.strip()
    try:
        if spec.type == "number":
            return float(text)
        if spec.type == "integer":
            return int(text)
        if spec.type == "boolean":
            folded = text.lower()
            if folded in _TRUE | _FALSE:
                return folded in _TRUE
            raise ValueError(text)
        if spec.type == "list":
            return [part.strip() for part in text.split(spec.separator) if part.strip()]
    except ValueError as exc:
        raise MappingErrors(
            [
                Problem(
                    location, f"invalid_{spec.type}", f"column {spec.column!r} is not a {spec.type}"
                )
            ]
        ) from exc
    return text


def _put(record: dict[str, Any], path: str, value: Any) -> None:
    node = record
    *parents, last = path.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def csv_row_to_record(profile: CsvImportProfile, row: dict[str, str]) -> dict[str, Any]:
    """One CSV row (``csv.DictReader``) -> the JSON record its channel takes.

    Constants come first, then each mapped column that has a non-empty cell.

    Args:
        profile: the validated CSV import profile.
        row: the row, column name -> cell text.

    Returns:
        The record (an intake submission or a canonical checkout, per ``profile.record``).

    Raises:
        MappingErrors: a mapped column is missing from the file, or a cell does not read
            as its type; every problem listed, named by path and column, never by value.
    """
    record: dict[str, Any] = {}
    for path, value in profile.constants.items():
        _put(record, path, value)
    problems: list[Problem] = []
    for path, spec in profile.columns.items():
        if spec.column not in row:
            problems.append(
                Problem(path, "missing_column", f"the file has no column {spec.column!r}")
            )
            continue
        cell = row[spec.column]
        if cell is None or not cell.strip():
            continue
        try:
            _put(record, path, _cell(cell, spec, path))
        except MappingErrors as exc:
            problems.extend(exc.problems)
    if problems:
        raise MappingErrors(problems)
    return record
