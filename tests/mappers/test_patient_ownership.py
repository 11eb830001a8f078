"""Merging a Patient by element ownership: fills, corrections, conflicts both ways."""

from __future__ import annotations

from typing import Any

from mappers.patient import (
    element_sources,
    get_element,
    merge_patient,
    phone_contact_point,
    phone_extension,
)


def _patient(**elements: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "id": "p1", "identifier": []}
    p.update(elements)
    return p


PHONE_A = [{"system": "phone", "value": "+14155550100", "use": "mobile"}]
PHONE_B = [{"system": "phone", "value": "+14155550199"}]


def test_fill_when_absent_is_no_conflict() -> None:
    existing = _patient(name=[{"family": "Lee"}], gender="female")
    incoming = _patient(telecom=PHONE_B, gender="unknown")
    r = merge_patient(existing, incoming, source="checkout", owns=[], sources={})
    assert r.patient["telecom"] == PHONE_B
    assert r.patient["gender"] == "female"  # a placeholder never wins
    assert r.conflicts == []
    assert r.sources["telecom.phone"] == "checkout"


def test_non_owner_loses_and_its_value_is_kept() -> None:
    existing = _patient(telecom=PHONE_A)
    incoming = _patient(telecom=PHONE_B)
    r = merge_patient(
        existing, incoming, source="checkout", owns=[], sources={"telecom.phone": "intake"}
    )
    assert r.patient["telecom"] == PHONE_A
    (c,) = r.conflicts
    assert (c.element, c.outcome, c.kept_source, c.lost_source) == (
        "telecom.phone",
        "kept_existing",
        "intake",
        "checkout",
    )
    assert c.lost_value == PHONE_B


def test_owner_replaces_and_the_replaced_value_is_kept() -> None:
    existing = _patient(birthDate="1980-01-01")
    incoming = _patient(birthDate="1980-01-02")
    r = merge_patient(
        existing, incoming, source="intake", owns=["birthDate"], sources={"birthDate": "checkout"}
    )
    assert r.patient["birthDate"] == "1980-01-02"
    (c,) = r.conflicts
    assert (c.outcome, c.kept_source, c.lost_source, c.lost_value) == (
        "replaced_existing",
        "intake",
        "checkout",
        "1980-01-01",
    )
    assert r.sources["birthDate"] == "intake"


def test_same_source_correction_is_not_a_conflict() -> None:
    existing = _patient(address=[{"city": "Austin"}])
    incoming = _patient(address=[{"city": "Dallas"}])
    r = merge_patient(
        existing, incoming, source="intake", owns=[], sources={"address.home": "intake"}
    )
    assert r.patient["address"] == [{"city": "Dallas"}]
    assert r.conflicts == []


def test_order_does_not_matter_when_one_source_owns() -> None:
    intake = _patient(birthDate="1990-05-05")
    checkout = _patient(birthDate="1990-05-06")
    a = merge_patient(
        intake, checkout, source="checkout", owns=[], sources=element_sources(intake, "intake")
    )
    b = merge_patient(
        checkout,
        intake,
        source="intake",
        owns=["birthDate"],
        sources=element_sources(checkout, "checkout"),
    )
    assert (
        get_element(a.patient, "birthDate") == get_element(b.patient, "birthDate") == "1990-05-05"
    )
    assert len(a.conflicts) == len(b.conflicts) == 1


def test_identifiers_are_unioned_and_other_contact_points_kept() -> None:
    existing = _patient(
        identifier=[{"system": "s", "value": "1"}],
        telecom=[{"system": "fax", "value": "x"}, *PHONE_A],
    )
    incoming = _patient(
        identifier=[{"system": "s", "value": "2"}], telecom=[{"system": "email", "value": "a@b.c"}]
    )
    r = merge_patient(existing, incoming, source="checkout", owns=[], sources={})
    assert [i["value"] for i in r.patient["identifier"]] == ["1", "2"]
    assert [t["system"] for t in r.patient["telecom"]] == ["phone", "email", "fax"]


def test_birthsex_extension_is_an_element() -> None:
    url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
    existing = _patient(
        extension=[{"url": url, "valueCode": "UNK"}, {"url": "other", "valueString": "x"}]
    )
    incoming = _patient(extension=[{"url": url, "valueCode": "F"}])
    r = merge_patient(existing, incoming, source="intake", owns=["birthsex"], sources={})
    assert r.patient["extension"][0] == {"url": url, "valueCode": "F"}
    assert {"url": "other", "valueString": "x"} in r.patient["extension"]
    assert r.conflicts == []  # UNK was a placeholder


def test_addresses_of_different_uses_do_not_conflict() -> None:
    home = {"use": "home", "city": "Austin"}
    billing = {"use": "billing", "city": "Dallas"}
    r = merge_patient(
        _patient(address=[home]),
        _patient(address=[billing]),
        source="checkout",
        owns=[],
        sources={"address.home": "intake"},
    )
    assert r.patient["address"] == [home, billing]
    assert r.conflicts == []


def test_the_same_name_and_phone_in_other_words_are_not_conflicts() -> None:
    """The README walkthrough: the intake's "Jordan Rivera" and mobile phone, then the
    Stripe checkout's name (with text) and phone (without use) for the same person."""
    existing = _patient(
        name=[{"use": "official", "family": "Rivera", "given": ["Jordan"]}],
        telecom=[{"system": "phone", "value": "+14155552671", "use": "mobile"}],
    )
    incoming = _patient(
        name=[
            {"use": "official", "text": "Jordan Rivera", "family": "Rivera", "given": ["Jordan"]}
        ],
        telecom=[{"system": "phone", "value": "+14155552671"}],
    )
    sources = {"name": "intake", "telecom.phone": "intake"}
    r = merge_patient(existing, incoming, source="checkout", owns=[], sources=sources)
    assert r.conflicts == []
    assert r.patient["name"] == existing["name"]
    assert r.patient["telecom"] == existing["telecom"]
    assert r.sources == sources
    # the owner's wording wins without a conflict
    r = merge_patient(
        incoming, existing, source="intake", owns=["name", "telecom.phone"], sources={}
    )
    assert r.conflicts == []
    assert r.patient["name"] == existing["name"]
    assert r.patient["telecom"] == existing["telecom"]


def test_another_given_name_or_number_is_still_a_conflict() -> None:
    existing = _patient(name=[{"family": "Rivera", "given": ["Jordan"]}], telecom=PHONE_A)
    incoming = _patient(name=[{"family": "Rivera", "given": ["J."]}], telecom=PHONE_B)
    sources = {"name": "intake", "telecom.phone": "intake"}
    r = merge_patient(existing, incoming, source="checkout", owns=[], sources=sources)
    assert [c.element for c in r.conflicts] == ["name", "telecom.phone"]


CP_EXT = "http://hl7.org/fhir/StructureDefinition/contactpoint-extension"


def _phone(value: str, extension: str | None = None, **more: Any) -> dict[str, Any]:
    point: dict[str, Any] = {}
    if extension:
        point["extension"] = [{"url": CP_EXT, "valueString": extension}]
    return {**point, "system": "phone", "value": value, **more}


def test_phone_contact_point_puts_the_extension_beside_the_e164_value() -> None:
    assert phone_contact_point("+14155552671;ext=12", use="work") == _phone(
        "+14155552671", "12", use="work"
    )
    assert phone_contact_point("+14155552671") == _phone("+14155552671")
    assert phone_extension(_phone("+14155552671", "12")) == "12"
    assert phone_extension(_phone("+14155552671")) is None


def test_the_same_number_with_and_without_an_extension_is_one_phone() -> None:
    """The intake gave the number with its extension, the Stripe checkout (which has no
    extension field) the bare number: no conflict, and the extension is kept."""
    with_ext = [_phone("+14155552671", "12", use="mobile")]
    bare = [_phone("+14155552671")]
    sources = {"telecom.phone": "intake"}
    r = merge_patient(
        _patient(telecom=with_ext),
        _patient(telecom=bare),
        source="checkout",
        owns=[],
        sources=sources,
    )
    assert (r.conflicts, r.patient["telecom"]) == ([], with_ext)
    # the other way round: the bare number came first, the extension fills it in
    sources = {"telecom.phone": "checkout"}
    r = merge_patient(
        _patient(telecom=bare),
        _patient(telecom=with_ext),
        source="intake",
        owns=[],
        sources=sources,
    )
    assert (r.conflicts, r.patient["telecom"]) == ([], [_phone("+14155552671", "12")])
    assert r.sources == sources
    # an owner without the extension keeps the one the other source gave
    r = merge_patient(
        _patient(telecom=with_ext),
        _patient(telecom=[_phone("+14155552671", use="home")]),
        source="intake",
        owns=["telecom.phone"],
        sources={"telecom.phone": "checkout"},
    )
    assert (r.conflicts, r.patient["telecom"]) == ([], [_phone("+14155552671", "12", use="home")])


def test_the_same_source_dropping_its_extension_is_a_correction() -> None:
    r = merge_patient(
        _patient(telecom=[_phone("+14155552671", "12")]),
        _patient(telecom=[_phone("+14155552671")]),
        source="intake",
        owns=[],
        sources={"telecom.phone": "intake"},
    )
    assert (r.conflicts, r.patient["telecom"]) == ([], [_phone("+14155552671")])


def test_two_different_extensions_of_one_number_are_a_conflict() -> None:
    r = merge_patient(
        _patient(telecom=[_phone("+14155552671", "12")]),
        _patient(telecom=[_phone("+14155552671", "34")]),
        source="checkout",
        owns=[],
        sources={"telecom.phone": "intake"},
    )
    assert [(c.element, c.outcome) for c in r.conflicts] == [("telecom.phone", "kept_existing")]
    assert r.conflicts[0].lost_value == [_phone("+14155552671", "34")]
    assert r.patient["telecom"] == [_phone("+14155552671", "12")]
