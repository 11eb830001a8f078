"""Synthetic sample payloads for tests and benchmarks (no real patient data)."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def intake(**overrides: Any) -> dict[str, Any]:
    """The bundled GLP-1 intake sample with a fresh submission id and patient."""
    data: dict[str, Any] = json.loads((EXAMPLES / "intake-glp1.json").read_text())
    tag = uuid.uuid4().hex[:8]
    data["submission_id"] = f"sub-{tag}"
    data["patient"]["external_id"] = f"pt-{tag}"
    data["patient"]["email"] = f"jordan.rivera+{tag}@example.com"
    data["submitted_at"] = "2026-11-23T14:00:00-05:00"
    for key, value in overrides.items():
        data[key] = value
    return data


def canonical_checkout(**overrides: Any) -> dict[str, Any]:
    """A canonical (non-Stripe) paid checkout."""
    tag = uuid.uuid4().hex[:8]
    data: dict[str, Any] = {
        "checkout_id": f"chk-{tag}",
        "processor": "square",
        "completed_at": "2026-11-23T19:05:00Z",
        "plan": "glp1-semaglutide-starter",
        "customer": {
            "name": "Jordan Rivera",
            "email": f"jordan.rivera+{tag}@example.com",
            "phone": "415-555-2671",
            "address": {
                "line1": "100 Market St",
                "city": "San Francisco",
                "state": "CA",
                "postal_code": "94105",
            },
        },
        "amount_total": 29900,
        "currency": "USD",
        "payment_status": "paid",
    }
    data.update(overrides)
    return data


def stripe_event(**session_overrides: Any) -> dict[str, Any]:
    """A Stripe ``checkout.session.completed`` event with fresh ids."""
    data: dict[str, Any] = json.loads(
        (EXAMPLES / "stripe-checkout-session-completed.json").read_text()
    )
    tag = uuid.uuid4().hex[:8]
    data["id"] = f"evt_{tag}"
    session = data["data"]["object"]
    session["id"] = f"cs_test_{tag}"
    session["metadata"] = {"plan": "glp1-semaglutide-starter", "patient_external_id": f"pt-{tag}"}
    session["customer_details"]["email"] = f"jordan.rivera+{tag}@example.com"
    for key, value in session_overrides.items():
        session[key] = value
    return copy.deepcopy(data)
