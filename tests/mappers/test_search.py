"""FHIR R4 search rules (https://hl7.org/fhir/R4/search.html) on resources, without a
server: date prefixes on ranges, string matching, token forms, references, escaping, and
the errors of a query that cannot be read."""

from __future__ import annotations

from typing import Any

import pytest

from mappers import search as fs

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"lastUpdated": "2026-12-07T10:00:00Z"},
    "identifier": [{"system": "urn:mrn", "value": "MRN-1", "type": {"text": "Medical record"}}],
    "name": [{"family": "Brontë", "given": ["Élodie", "Ann"]}],
    "birthDate": "1975-02-03",
    "gender": "female",
    "telecom": [
        {"system": "phone", "value": "+14155552671"},
        {"system": "email", "value": "Elodie@Example.com"},
    ],
    "address": [{"line": ["1 Main St"], "city": "Springfield", "postalCode": "01101"}],
}


def hits(query: str, resource: dict[str, Any] = PATIENT, *, strict: bool = True) -> bool:
    from urllib.parse import parse_qsl

    parsed = fs.parse_search(resource["resourceType"], parse_qsl(query), strict=strict)
    return fs.matches(parsed, resource, base_url="https://gw.example/fhir")


# the R4 prefix table, on a day-precision element (1975-02-03 is [00:00, 24:00) UTC)
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("birthdate=1975-02-03", True),
        ("birthdate=1975-02", True),  # the month contains the day
        ("birthdate=1975", True),
        ("birthdate=1975-02-03T12:00", False),  # the minute does not contain the day
        ("birthdate=ne1975-02-03", False),
        ("birthdate=gt1975-02-02", True),
        ("birthdate=gt1975-02-03", False),
        ("birthdate=ge1975-02-03", True),
        ("birthdate=lt1975-02-04", True),
        ("birthdate=lt1975-02-03", False),
        ("birthdate=le1975-02-03", True),
        ("birthdate=sa1975-02-02", True),
        ("birthdate=sa1975-02-03", False),
        ("birthdate=eb1975-02-04", True),
        ("birthdate=eb1975-02-03", False),
        ("birthdate=ap1975", True),
        ("birthdate=ge1975-01-01&birthdate=lt1976-01-01", True),  # repeated: AND
        ("birthdate=ge1976-01-01&birthdate=lt1977-01-01", False),
        ("_lastUpdated=gt2026-12-07T09:59:59Z", True),
        ("_lastUpdated=gt2026-12-07T12:00:00%2B02:00", False),  # 10:00Z, not after
    ],
)
def test_date_prefixes(query: str, expected: bool) -> None:
    assert hits(query) is expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=bro", True),  # starts-with, accent- and case-insensitive
        ("name=ELO", True),  # any part of the name
        ("name=ann", True),
        ("name=ront", False),  # not starts-with
        ("name:contains=ront", True),
        ("family:exact=Brontë", True),
        ("family:exact=bronte", False),
        ("given=elodie", True),
        ("address=spring", True),
        ("name=x,bro", True),  # comma: OR
    ],
)
def test_strings(query: str, expected: bool) -> None:
    assert hits(query) is expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("identifier=urn:mrn|MRN-1", True),
        ("identifier=MRN-1", True),  # any system
        ("identifier=|MRN-1", False),  # no system
        ("identifier=urn:mrn|", True),  # any value of the system
        ("identifier=urn:other|MRN-1", False),
        ("identifier:text=medical", True),
        ("gender=female", True),
        ("gender:not=female", False),
        ("email=elodie@example.com", True),  # emails compare case-insensitively
        ("phone=(415) 555-2671", True),  # digits, +1 optional
        ("telecom=phone|4155552671", True),
        ("telecom=email|4155552671", False),
        ("active:missing=true", True),
        ("active:missing=false", False),
    ],
)
def test_tokens(query: str, expected: bool) -> None:
    assert hits(query) is expected


QR: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse",
    "id": "q1",
    "subject": {"reference": "Patient/p1"},
    "questionnaire": "https://gw.example/fhir/Questionnaire/intake|2",
    "authored": "2026-11-23T14:00:00-05:00",
    "status": "completed",
}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("patient=p1", True),
        ("patient=Patient/p1", True),
        ("patient=https://gw.example/fhir/Patient/p1", True),  # absolute, on this server
        ("subject:Patient=p1", True),
        ("patient=p2", False),
        ("questionnaire=https://gw.example/fhir/Questionnaire/intake", True),  # any version
        ("questionnaire=https://gw.example/fhir/Questionnaire/intake|2", True),
        ("questionnaire=https://gw.example/fhir/Questionnaire/intake|1", False),
        ("authored=2026-11-23", True),  # 19:00Z on the 23rd
        ("authored=gt2026-11-23T18:59:00Z", True),
        ("authored=lt2026-11-23T19:00:00Z", False),
    ],
)
def test_references_and_canonicals(query: str, expected: bool) -> None:
    assert hits(query, QR) is expected


def test_an_escaped_comma_is_part_of_the_value() -> None:
    resource = dict(PATIENT, name=[{"family": "Smith, Jr"}])
    assert hits(r"family=smith\,", resource)
    assert not hits(r"family=smith\,x", resource)


def test_lenient_ignores_and_strict_refuses_unknown_parameters() -> None:
    parsed = fs.parse_search("Patient", [("shoe", "9"), ("family", "x")], strict=False)
    assert parsed.ignored == ("shoe",)
    assert ("shoe", "9") not in parsed.params()
    with pytest.raises(fs.SearchError) as caught:
        fs.parse_search("Patient", [("shoe", "9"), ("name:near", "x")], strict=True)
    assert [name for name, _ in caught.value.problems] == ["shoe", "name:near"]


@pytest.mark.parametrize(
    "item",
    [
        ("birthdate", "bad"),
        ("birthdate", "zz2020"),
        ("_count", "x"),
        ("_total", "some"),
        ("family", ""),
        ("_include", "Patient"),
        ("active:missing", "maybe"),
    ],
)
def test_values_that_cannot_be_read_are_errors_even_when_lenient(item: tuple[str, str]) -> None:
    with pytest.raises(fs.SearchError):
        fs.parse_search("Patient", [item], strict=False)


def test_errors_never_hold_the_value() -> None:
    with pytest.raises(fs.SearchError) as caught:
        fs.parse_search("Patient", [("birthdate", "Jordan Rivera")], strict=True)
    assert "Jordan" not in str(caught.value)


def test_elements_keep_the_mandatory_ones_and_tag_subsetted() -> None:
    out = fs.subset(PATIENT, elements=["gender"])
    assert set(out) == {"resourceType", "id", "meta", "gender"}
    assert fs.SUBSETTED in out["meta"]["tag"]
    assert "tag" not in PATIENT["meta"]  # the stored resource is not changed
