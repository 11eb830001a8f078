"""What duplicate review compares of a Patient, read from its FHIR resource (pure).

:func:`features` turns a Patient (R4 JSON, https://hl7.org/fhir/R4/patient.html) into
the normalized values the duplicate score of :mod:`gateway.patients.review` compares:
the first name with a family or given name (accents, case and punctuation dropped), the
``birthDate``, the first usable phone (digits, a leading US ``1`` dropped) and email
(case-folded), and the first address's line and 5-digit postal code. The gateway keeps
them per stored Patient in ``patient_review_features`` (written with the Patient), so a
new patient's candidates are read and scored without decoding and normalizing every
candidate's resource again.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["Features", "address", "digits", "features", "names", "norm", "telecom"]


@lru_cache(maxsize=65536)
def norm(text: str) -> str:
    """``text`` folded for comparison: accents dropped (NFKD), case-folded, only ``a-z``,
    ``0-9`` and spaces kept, trimmed. Cached: names repeat across patients.

    >>> norm("  Ní Bhriain-O'Neill ")
    'ni bhriainoneill'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return re.sub(r"[^a-z0-9 ]+", "", letters).strip()


def names(patient: dict[str, Any]) -> tuple[str, str] | None:
    """``(family, given)`` of the first ``Patient.name`` that has either, normalized
    (:func:`norm`; the given names joined by a space), or None."""
    for name in patient.get("name") or []:
        family = norm(name.get("family") or "")
        given = norm(" ".join(name.get("given") or []))
        if family or given:
            return family, given
    return None


#: An email the review can compare: something@domain.tld.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_NOT_DIGIT = re.compile(r"\D")


def digits(phone: str) -> str:
    """The digits of a phone number, a leading US ``1`` of an 11-digit number dropped."""
    found = _NOT_DIGIT.sub("", phone)
    return found[1:] if len(found) == 11 and found.startswith("1") else found


def telecom(patient: dict[str, Any], system: str) -> str | None:
    """The first usable ``phone`` or ``email`` of ``patient`` (``system``), as stored.
    A placeholder an old system kept and a bulk import carried over as exported (``n/a``,
    ``000-000-0000``: shared by many patients) is skipped: it would score unrelated
    patients as duplicates."""
    for cp in patient.get("telecom") or []:
        if cp.get("system") == system and cp.get("value"):
            value = str(cp["value"])
            if system == "phone":
                number = digits(value)
                if len(number) < 10 or len(set(number[-7:])) == 1:
                    continue
            elif system == "email" and not _EMAIL.fullmatch(value.strip()):
                continue
            return value
    return None


def address(patient: dict[str, Any]) -> tuple[str, str] | None:
    """``(line, postal code)`` of the first address with either: the lines joined and
    normalized (:func:`norm`), the first 5 characters of ``postalCode``; or None."""
    for entry in patient.get("address") or []:
        line = norm(" ".join(entry.get("line") or []))
        postal = (entry.get("postalCode") or "")[:5]
        if line or postal:
            return line, postal
    return None


@dataclass(frozen=True)
class Features:
    """What the duplicate score compares of one Patient (see the module docstring)."""

    names: tuple[str, str] | None
    birth_date: str | None
    phone: str | None  # digits (a leading US 1 dropped)
    email: str | None  # case-folded
    address: tuple[str, str] | None  # (normalized line, 5-character postal code)

    @property
    def scorable(self) -> bool:
        """A name and a birth date: without both there is no score."""
        return self.names is not None and bool(self.birth_date)


def features(patient: dict[str, Any], *, known_names: tuple[str, str] | None = None) -> Features:
    """The :class:`Features` of a Patient resource (R4 JSON); ``known_names``: its
    :func:`names` when the caller has them already."""
    phone, email = telecom(patient, "phone"), telecom(patient, "email")
    born = patient.get("birthDate")
    return Features(
        names=known_names if known_names is not None else names(patient),
        birth_date=str(born) if born else None,
        phone=digits(phone) if phone else None,
        email=email.casefold() if email else None,
        address=address(patient),
    )
