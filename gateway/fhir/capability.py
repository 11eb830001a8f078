"""The CapabilityStatement (``GET /fhir/metadata``) and the SMART configuration
(``/.well-known/smart-configuration``), built from what is really served.

Interactions come from the app's routes (a route missing from the app is not listed:
:data:`ROUTE_INTERACTIONS`), search parameters from :data:`mappers.search.SEARCH_PARAMETERS`
(the table the search itself runs on) and from the two searches that live elsewhere
(``AuditEvent``, ``Questionnaire``). https://hl7.org/fhir/R4/capabilitystatement.html,
SMART: https://hl7.org/fhir/smart-app-launch/conformance.html.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mappers import search as fs

FHIR_VERSION = "4.0.1"

#: (route path, method) -> (resource types, interaction code); ``*`` is every type of
#: :data:`mappers.search.SEARCH_PARAMETERS`.
ROUTE_INTERACTIONS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("/fhir/{resource_type}/{resource_id}", "GET"): (("*",), "read"),
    ("/fhir/{resource_type}/{resource_id}/_history/{version_id}", "GET"): (("*",), "vread"),
    ("/fhir/{resource_type}/{resource_id}/_history", "GET"): (("*",), "history-instance"),
    ("/fhir/{resource_type}", "GET"): (("*",), "search-type"),
    ("/fhir/{resource_type}/_search", "POST"): (("*",), "search-type"),
    ("/fhir/AuditEvent", "GET"): (("AuditEvent",), "search-type"),
    ("/fhir/Questionnaire", "GET"): (("Questionnaire",), "search-type"),
    ("/fhir/Questionnaire/{questionnaire_id}", "GET"): (("Questionnaire",), "read"),
}

EVERYTHING_ROUTE = ("/fhir/Patient/{patient_id}/$everything", "GET")

#: Search parameters of the searches outside :mod:`mappers.search`: name, type,
#: definition.
OTHER_SEARCH_PARAMETERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "AuditEvent": (
        ("patient", "reference", fs.R4 + "AuditEvent-patient"),
        ("agent", "reference", fs.R4 + "AuditEvent-agent"),
        ("date", "date", fs.R4 + "AuditEvent-date"),
        ("action", "token", fs.R4 + "AuditEvent-action"),
    ),
    "Questionnaire": (
        ("url", "uri", fs.R4 + "Questionnaire-url"),
        ("version", "token", fs.R4 + "Questionnaire-version"),
    ),
}

SMART_CAPABILITIES = ["client-confidential-asymmetric", "permission-v2"]

#: The SMART v2 scopes a backend client may ask for, beside the gateway's own.
SMART_SCOPES = [f"system/{t}.rs" for t in fs.SEARCH_PARAMETERS] + ["system/*.rs"]


def capability_statement(
    routes: Iterable[tuple[str, str]],
    *,
    base_url: str,
    token_url: str,
    software_version: str,
    date: str,
) -> dict[str, Any]:
    """The server's CapabilityStatement.

    Args:
        routes: ``(path, method)`` of every route the app serves.
        base_url: the FHIR base (``<public base>/fhir``).
        token_url: the OAuth token endpoint (SMART Backend Services).
        date: when this statement was built (FHIR dateTime).
    """
    served = set(routes)
    interactions: dict[str, list[str]] = {}
    for route, (types, code) in ROUTE_INTERACTIONS.items():
        if route not in served:
            continue
        for rtype in fs.SEARCH_PARAMETERS if types == ("*",) else types:
            if code not in interactions.setdefault(rtype, []):
                interactions[rtype].append(code)
    resources = []
    for rtype in sorted(interactions):
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": c} for c in interactions[rtype]],
            "versioning": "versioned",
            "readHistory": "history-instance" in interactions[rtype],
        }
        if rtype in fs.SEARCH_PARAMETERS and "search-type" in interactions[rtype]:
            params = fs.SEARCH_PARAMETERS[rtype]
            entry["searchInclude"] = [f"{rtype}:{p.name}" for p in params if p.type == "reference"]
            entry["searchRevInclude"] = sorted(
                f"{src}:{p.name}"
                for src, ps in fs.SEARCH_PARAMETERS.items()
                for p in ps
                if p.type == "reference" and rtype in p.targets
            )
            entry["searchParam"] = [
                {"name": p.name, "definition": p.definition, "type": p.type}
                | ({"documentation": p.documentation} if p.documentation else {})
                for p in params
            ]
        elif rtype in OTHER_SEARCH_PARAMETERS and "search-type" in interactions[rtype]:
            entry["searchParam"] = [
                {"name": n, "definition": d, "type": t}
                for n, t, d in OTHER_SEARCH_PARAMETERS[rtype]
            ]
        if rtype == "Patient" and EVERYTHING_ROUTE in served:
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
        resources.append(entry)
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "fhir-gateway",
        "kind": "instance",
        "software": {"name": "fhir-gateway", "version": software_version},
        "implementation": {"description": "fhir-gateway FHIR face", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Search follows https://hl7.org/fhir/R4/search.html; unknown parameters "
                    "are ignored (left out of the self link) unless Prefer: handling=strict."
                ),
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ],
                            "text": "SMART Backend Services (client_credentials with a "
                            "private_key_jwt assertion), or an API key as a bearer token",
                        }
                    ],
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/"
                            "oauth-uris",
                            "extension": [{"url": "token", "valueUri": token_url}],
                        }
                    ],
                },
                "resource": resources,
            }
        ],
    }
    rest = statement["rest"][0]
    if EVERYTHING_ROUTE in served:
        rest["operation"] = [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            }
        ]
    return statement


def smart_configuration(*, token_url: str, jwks_uri: str) -> dict[str, Any]:
    """The SMART configuration (https://hl7.org/fhir/smart-app-launch/conformance.html):
    the token endpoint, ``client_credentials`` with ``private_key_jwt`` (RS384, ES384),
    the scopes and capabilities."""
    return {
        "token_endpoint": token_url,
        "jwks_uri": jwks_uri,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SMART_SCOPES,
        "capabilities": SMART_CAPABILITIES,
        "code_challenge_methods_supported": [],
    }
