"""``GET /.well-known/jwks.json``: the public keys the gateway signs SMART client
assertions with (RFC 7517 section 5), for EHRs that register a JWKS URL.

It lists the gateway's published keys (pending, active and retiring ones: see
:mod:`gateway.oauth.keys`) and the public half of every key file an enabled target names.
``Cache-Control: max-age`` is ``GATEWAY_JWKS_MAX_AGE``; SMART servers must not cache the
set longer (https://hl7.org/fhir/smart-app-launch/backend-services.html).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from gateway.db.types import utcnow
from gateway.deps import RuntimeDep, SessionDep
from gateway.logging import get_logger
from gateway.oauth.keys import KeyFileError, load_key_file, public_jwk, published_jwks

log = get_logger(__name__)

router = APIRouter(tags=["oauth"])


@router.get(
    "/.well-known/jwks.json",
    summary="The gateway's public signing keys (JWKS)",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "The JWK Set (RFC 7517 section 5)",
            "content": {
                "application/jwk-set+json": {
                    "schema": {
                        "type": "object",
                        "required": ["keys"],
                        "properties": {"keys": {"type": "array", "items": {"type": "object"}}},
                    }
                }
            },
        }
    },
)
async def jwks(session: SessionDep, runtime: RuntimeDep) -> JSONResponse:
    """The JWKS: ``{"keys": [...]}``, public members only."""
    keys: list[dict[str, Any]] = await published_jwks(session, now=utcnow())
    profiles = runtime.profiles.current
    for target in profiles.enabled_targets():
        auth = target.auth
        if auth.method != "private_key_jwt" or not auth.private_key_file:
            continue
        path = Path(auth.private_key_file)
        try:
            material = load_key_file(
                path if path.is_absolute() else profiles.root / path, alg=auth.alg, kid=auth.kid
            )
        except KeyFileError:
            log.warning("jwks.key_file_unusable", target=target.name)
            continue
        keys.append(public_jwk(material.key, kid=material.kid, alg=material.alg))
    unique = list({k["kid"]: k for k in keys}.values())
    max_age = int(runtime.settings.jwks_max_age.total_seconds())
    return JSONResponse(
        {"keys": unique},
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={max_age}"},
    )
