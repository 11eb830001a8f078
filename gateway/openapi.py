"""The OpenAPI document (``GET /openapi.json``): what the service really does.

FastAPI derives the paths, parameters and bodies from the routes; :func:`build_openapi`
adds what it cannot see, from the same routes, so the document cannot drift from them:

* **security per operation**: the scopes of the route's ``require_scope`` dependency
  (:func:`gateway.deps.scopes_of`), one security requirement per scope that opens it
  (OpenAPI 3.1 lets a non-OAuth requirement list role names); ``security: []`` on public
  and signed routes (health, JWKS, Stripe, partner webhooks, EHR notifications);
* **every status code** the gateway can answer: 400 (a NUL character in the path or
  query, :class:`gateway.app.RequestGuardMiddleware`), 401 and 403 on authenticated
  routes, 404 where the path names something, 413 where a body is read, 500 (an
  unexpected failure, :class:`gateway.app.UnexpectedErrorMiddleware`); each error
  described as what is sent: RFC 9457 problem details on ``/v1``, an OperationOutcome
  (``application/fhir+json``) on ``/fhir``;
* **media types**: FHIR answers are ``application/fhir+json``.

``tests/security/test_fuzz_openapi.py`` holds the service to this document
(schemathesis: status codes, media types, headers and bodies of every answer).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from gateway.deps import scopes_of
from gateway.http import DOCUMENTED_MODELS

#: The security schemes: the API key as a bearer token, or in ``X-API-Key``.
SECURITY_SCHEMES: dict[str, Any] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "API key from `fhir-gateway clients create` (`Authorization: Bearer <key>`)",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same API key in the `X-API-Key` header",
    },
}

#: RFC 9457 problem details with the gateway's ``errors`` extension
#: (:func:`gateway.errors.problem_body`).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details (https://www.rfc-editor.org/rfc/rfc9457).",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "examples": ["urn:fhir-gateway:problem:validation-error"]},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "code", "detail"],
                "properties": {
                    "field": {"type": "string"},
                    "pointer": {
                        "type": "string",
                        "description": "JSON pointer (RFC 6901) into the request body",
                    },
                    "header": {
                        "type": "string",
                        "description": "the request header the problem is about",
                    },
                    "code": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        },
    },
}

#: The R4 OperationOutcome the ``/fhir`` routes answer errors with
#: (https://hl7.org/fhir/R4/operationoutcome.html).
OPERATION_OUTCOME_SCHEMA: dict[str, Any] = {
    "title": "OperationOutcome",
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {"type": "array", "items": {"type": "object"}},
    },
}

FHIR_JSON = "application/fhir+json"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app`` (see the module docstring for what is added to
    FastAPI's).

    Returns:
        The document as a dict, ready to serve as JSON.
    """
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in DOCUMENTED_MODELS:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        path = context.path_format or route.path_format
        item = schema["paths"].get(path, {})
        for method in context.methods or route.methods or ():
            operation = item.get(method.lower())
            if operation is not None:
                _document_operation(operation, route, path)
    document_error_responses(schema)
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    schema.pop("security", None)
    return schema


def _route_scopes(dependant: Dependant) -> Iterator[str]:
    for dependency in dependant.dependencies:
        scopes = scopes_of(dependency.call) if dependency.call is not None else None
        if scopes:
            yield from scopes
        yield from _route_scopes(dependency)


def _document_operation(operation: dict[str, Any], route: APIRoute, path: str) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    scopes = sorted(set(_route_scopes(route.dependant)))
    if scopes:
        operation["security"] = [
            {scheme: [scope]} for scope in scopes for scheme in SECURITY_SCHEMES
        ]
        responses.setdefault("401", {"description": "No API key, or one that is not valid"})
        responses.setdefault("403", {"description": "The API key lacks the route's scope"})
        scope_text = " or ".join(f"`{s}`" for s in scopes)
        operation["description"] = (
            operation.get("description", "") + f"\n\nScope: {scope_text}."
        ).strip()
    else:
        operation["security"] = []
    for parameter in operation.get("parameters", []):
        _refuse_nul(parameter.get("schema", {}))
    responses.setdefault("400", {"description": "A NUL character in the path or query"})
    if "{" in path:
        responses.setdefault("404", {"description": "No such resource"})
    if "requestBody" in operation:
        responses.setdefault("413", {"description": "The body is larger than the limit"})
    responses.setdefault("500", {"description": "An unexpected error (details only in the logs)"})
    if path.startswith("/fhir") and "/.well-known/" not in path:  # SMART's is plain JSON
        for code, response in responses.items():
            content = response.get("content", {})
            if code.startswith("2") and "application/json" in content:
                content[FHIR_JSON] = content.pop("application/json")


#: No NUL character (the gateway refuses one in a path, query or header with 400).
NO_NUL_PATTERN = "^[^\\x00]*$"


def _refuse_nul(schema: dict[str, Any]) -> None:
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") == "string":
            option.setdefault("pattern", NO_NUL_PATTERN)
        elif option.get("type") == "array":
            _refuse_nul(option.get("items", {}))


def document_error_responses(schema: dict[str, Any]) -> None:
    """Describe every 4xx/5xx response of ``schema`` as what the gateway sends: RFC 9457
    problem details (``application/problem+json``), or an OperationOutcome
    (``application/fhir+json``) under ``/fhir``, instead of FastAPI's ``HTTPValidationError``
    (which the gateway never answers) or no body at all."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    components["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    outcome = {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}}
    oauth_error: dict[str, Any] = {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "error_description": {"type": "string"},
                },
            }
        }
    }
    for path, operations in schema.get("paths", {}).items():
        fhir = path == "/fhir" or path.startswith("/fhir/")
        # An EHR posting a notification may ask for an OperationOutcome (gateway.app).
        either = path.startswith("/v1/ehr/") and path.endswith("/notifications")
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if code[:1] in ("4", "5"):
                    content: dict[str, Any] = (
                        outcome if fhir else problem | outcome if either else problem
                    )
                    if path == "/oauth/token" and code in ("400", "401"):
                        # RFC 6749 section 5.2 errors; a NUL in the query is still a problem
                        content = oauth_error if code == "401" else problem | oauth_error
                    response["content"] = copy.deepcopy(content)
                    if response.get("description") in (None, "", "Validation Error"):
                        response["description"] = HTTPStatus(int(code)).phrase
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in json.dumps(schema):
            components.pop(unused, None)
