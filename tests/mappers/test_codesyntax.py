"""mappers.codesyntax: the form of RxNorm, LOINC and SNOMED CT codes, and placeholders."""

from __future__ import annotations

import pytest

from mappers.codesyntax import LOINC, RXNORM, SNOMED_CT, code_syntax_problem


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (RXNORM, "1991306"),
        (LOINC, "29463-7"),  # body weight
        (LOINC, "8302-2"),  # body height
        (LOINC, "59284-0"),  # patient consent
        (SNOMED_CT, "44054006"),  # type 2 diabetes mellitus
        (SNOMED_CT, "34206005"),  # subcutaneous route
        (SNOMED_CT, "428041000124106"),  # an extension namespace id (15 digits)
        ("https://fhir-gateway.example.org/fhir/CodeSystem/x", "lose-weight"),
    ],
)
def test_real_codes_pass(system: str, code: str) -> None:
    assert code_syntax_problem(system, code) is None


@pytest.mark.parametrize(
    ("system", "code", "says"),
    [
        (RXNORM, "<the SCD RxCUI of the 2.4 mg pen, from RxNav>", "placeholder"),
        ("https://example.org/cs", "<fill me in>", "placeholder"),
        (RXNORM, "RX1991306", "digits only"),
        (LOINC, "29464", "<digits>-<check digit>"),
        (LOINC, "29463-8", "check digit"),  # a typo in the check digit
        (LOINC, "29436-7", "check digit"),  # two digits swapped
        (SNOMED_CT, "44054007", "Verhoeff"),
        (SNOMED_CT, "44050406", "Verhoeff"),  # two digits swapped
        (SNOMED_CT, "12345", "6 to 18 digits"),
        (SNOMED_CT, "044054006", "6 to 18 digits"),
    ],
)
def test_malformed_codes_are_named(system: str, code: str, says: str) -> None:
    message = code_syntax_problem(system, code)
    assert message is not None and says in message
    assert code not in message  # the rule is named, not the value


def test_concept_map_rows_are_checked_too() -> None:
    from mappers.conceptmap import concept_map_from_csv

    text = (
        "source_system,source_code,source_display,target_system,target_code,target_display,"
        "equivalence\n"
        f"{RXNORM},1991306,,urn:oid:1.2.3,OZ025,,equivalent\n"
        f"urn:free-text,htn,,{SNOMED_CT},38341004,Hypertensive disorder,equivalent\n"
        f"{RXNORM},<the RxCUI>,,urn:oid:1.2.3,OZ026,,equivalent\n"
    )
    resource, problems = concept_map_from_csv("m", text)
    assert resource is None
    assert [(p.location, p.code, p.message.split(":")[0]) for p in problems] == [
        ("line 3", "code-syntax", "target_code"),
        ("line 4", "code-syntax", "source_code"),
    ]
