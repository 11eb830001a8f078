"""Splitting a delivery into small transactions and into single REST calls."""

from __future__ import annotations

from typing import Any

import pytest

from mappers.bundle import (
    build_transaction_bundle,
    dependency_order,
    local_references,
    rest_calls,
    split_for_transaction,
    transaction_bundle,
)

TAG = "https://gw.example/provenance"


def res(rtype: str, rid: str, *refs: str, ident: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": rtype, "id": rid}
    if refs:
        resource["basedOn" if rtype == "MedicationRequest" else "target"] = [
            {"reference": r} for r in refs
        ]
    if ident:
        resource["identifier"] = [{"system": "https://gw.example/id", "value": ident}]
    return resource


def types(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def test_patient_comes_first_then_dependents() -> None:
    delivery = [
        res("Provenance", "v", "Patient/p", "QuestionnaireResponse/q"),
        res("QuestionnaireResponse", "q", "Patient/p"),
        res("Patient", "p"),
    ]

    assert types(dependency_order(delivery)) == [
        "Patient/p",
        "QuestionnaireResponse/q",
        "Provenance/v",
    ]


def test_given_order_is_kept_where_references_allow() -> None:
    delivery = [res("Patient", "p"), res("Observation", "b"), res("Observation", "a")]

    assert types(dependency_order(delivery)) == ["Patient/p", "Observation/b", "Observation/a"]


def test_a_reference_cycle_does_not_hang() -> None:
    delivery = [res("Provenance", "a", "Provenance/b"), res("Provenance", "b", "Provenance/a")]

    assert sorted(types(dependency_order(delivery))) == ["Provenance/a", "Provenance/b"]


@pytest.mark.parametrize(
    "max_entries, sizes", [(None, [5]), (5, [5]), (10, [5]), (2, [2, 2, 1]), (1, [1] * 5)]
)
def test_split_sizes(max_entries: int | None, sizes: list[int]) -> None:
    delivery = [
        res("Patient", "p"),
        res("QuestionnaireResponse", "q", "Patient/p"),
        res("MedicationRequest", "m", "Patient/p", "QuestionnaireResponse/q"),
        res("Observation", "o", "Patient/p"),
        res("Provenance", "v", "Patient/p", "QuestionnaireResponse/q", "MedicationRequest/m"),
    ]

    chunks = split_for_transaction(delivery, max_entries)

    assert [len(c) for c in chunks] == sizes
    assert chunks[0][0]["resourceType"] == "Patient"
    seen: set[str] = set()
    for chunk in chunks:  # every reference points to this chunk or an earlier one
        here = set(types(chunk))
        for resource in chunk:
            assert local_references(resource) <= seen | here
        seen |= here


def test_split_of_nothing_is_nothing() -> None:
    assert split_for_transaction([], 3) == []


def test_later_chunk_refers_to_the_ids_the_ehr_assigned() -> None:
    patient = res("Patient", "p", ident="pt-1")
    qr = res("QuestionnaireResponse", "q", "Patient/p", ident="sub-1")
    first, second = split_for_transaction([patient, qr], 1)

    bundle = build_transaction_bundle(
        second,
        remote_ids={"Patient/p": "ehr-42"},
        outside_identifiers={},
        provenance_tag_system=TAG,
    )

    assert first == [patient]
    assert bundle["entry"][0]["resource"]["target"] == [{"reference": "Patient/ehr-42"}]


def test_a_conditional_create_call() -> None:
    [call] = rest_calls(
        [res("Patient", "p", ident="pt 1")],
        remote_ids={},
        outside_identifiers={},
        provenance_tag_system=TAG,
    )

    assert (call.method, call.resource_type, call.resource_id) == ("POST", "Patient", None)
    assert call.if_none_exist == "identifier=https://gw.example/id|pt%201"
    assert "id" not in call.resource
    assert call.local_ref == "Patient/p"


def test_an_update_call() -> None:
    [call] = rest_calls(
        [res("Patient", "p", ident="pt-1")],
        remote_ids={"Patient/p": "ehr-9"},
        outside_identifiers={},
        provenance_tag_system=TAG,
    )

    assert (call.method, call.resource_type, call.resource_id) == ("PUT", "Patient", "ehr-9")
    assert call.resource["id"] == "ehr-9"
    assert call.if_none_exist is None


def test_a_transaction_is_the_same_calls_rendered_as_entries() -> None:
    patient = res("Patient", "p", ident="pt-1")
    qr = res("QuestionnaireResponse", "q", "Patient/p", ident="sub-1")
    calls = rest_calls(
        [patient, qr],
        remote_ids={"Patient/p": "ehr-9"},
        outside_identifiers={},
        provenance_tag_system=TAG,
    )

    bundle = transaction_bundle(calls)

    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": "Patient/ehr-9"},
        {"method": "POST", "url": "QuestionnaireResponse", "ifNoneExist": calls[1].if_none_exist},
    ]
    assert [e["fullUrl"] for e in bundle["entry"]] == ["urn:uuid:p", "urn:uuid:q"]
    assert [e["resource"] for e in bundle["entry"]] == [c.resource for c in calls]
    assert bundle == build_transaction_bundle(
        [patient, qr],
        remote_ids={"Patient/p": "ehr-9"},
        outside_identifiers={},
        provenance_tag_system=TAG,
    )


def test_the_docstring_examples_hold() -> None:
    import doctest

    import mappers.bundle

    failures, tried = doctest.testmod(mappers.bundle)
    assert tried >= 2 and failures == 0
