"""Synthetic sample payloads for tests and benchmarks (no real patient data)."""

from __future__ import annotations

import copy
import json
import random
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

_FIRST = [
    "Jordan",
    "Avery",
    "Riley",
    "Morgan",
    "Casey",
    "Taylor",
    "Quinn",
    "Harper",
    "Rowan",
    "Emerson",
    "Sage",
    "Dakota",
    "Elliot",
    "Reese",
    "Skyler",
    "Parker",
    "Hayden",
    "Jamie",
    "Alexis",
    "Cameron",
    "Drew",
    "Finley",
    "Kendall",
    "Logan",
    "Marley",
    "Noel",
    "Oakley",
    "Peyton",
    "Remy",
    "Sawyer",
    "Tatum",
    "Blake",
    "Charlie",
    "Devon",
    "Frankie",
    "Gray",
    "Jessie",
    "Kai",
    "Lane",
]
_LAST = [
    "Rivera",
    "Nguyen",
    "Patel",
    "Kim",
    "Okafor",
    "Garcia",
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
]
_STATES = ("CA", "NY", "TX", "FL", "WA", "IL", "MA", "CO", "GA", "AZ", "OR", "NJ", "PA")


def person(n: int) -> dict[str, str]:
    """Synthetic demographics number ``n`` (deterministic), spread like a population:
    about 1,500 names, birth dates over 65 years (1940-2004, about 24,000 dates), phone
    numbers in the fictional 555 exchange, 13 states.

    Benchmarks use it so that patient matching and merge review see what they see in
    production (a few candidates per birth date), not thousands of identical patients.

    Returns:
        ``first_name``, ``last_name``, ``birth_date`` (``MM/DD/YYYY``, as intake forms
        send it), ``birth_date_iso`` (``YYYY-MM-DD``), ``phone`` (``415-555-NNNN``) and
        ``state`` (USPS code).
    """
    rng = random.Random(n)
    born = date(1940, 1, 1) + timedelta(days=rng.randrange(65 * 365))
    return {
        "first_name": rng.choice(_FIRST),
        "last_name": rng.choice(_LAST),
        "birth_date": f"{born.month:02d}/{born.day:02d}/{born.year}",
        "birth_date_iso": born.isoformat(),
        "phone": f"415-555-{rng.randrange(10000):04d}",
        "state": rng.choice(_STATES),
    }


def varied(record: dict[str, Any], n: int) -> dict[str, Any]:
    """``record`` (from :func:`intake`, :func:`canonical_checkout` or
    :func:`stripe_event`) with the demographics of :func:`person` ``n`` (in place).
    """
    who = person(n)
    full = f"{who['first_name']} {who['last_name']}"
    if "submission_id" in record:
        patient = record["patient"]
        patient["first_name"], patient["last_name"] = who["first_name"], who["last_name"]
        patient["birth_date"], patient["phone"] = who["birth_date"], who["phone"]
        patient["address"]["state"] = who["state"]
    elif "checkout_id" in record:
        customer = record["customer"]
        customer["name"], customer["phone"] = full, who["phone"]
        customer["address"]["state"] = who["state"]
    else:
        details = record["data"]["object"]["customer_details"]
        details["name"], details["phone"] = full, "+1" + who["phone"].replace("-", "")
        details["address"]["state"] = who["state"]
    return record


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
