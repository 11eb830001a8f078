"""Semantic lint of a loaded profile set: what a schema cannot see.

Each rule has a stable code (the ``[code]`` at the end of a problem line) and is an error
(the set is refused) unless listed in :data:`WARNINGS`:

=========================  ===========================================================
code                       problem
=========================  ===========================================================
duplicate-key              two items of one form share an answer key
duplicate-link-id          two items of one form share a linkId
unknown-link-id            enable_when, an observation, or a FHIRPath rule names a
                           question the form does not have
unknown-answer             an enable_when answer that the question cannot have
choice-without-code        a choice answer option without ``system`` or ``code``
unknown-ucum-conversion    a unit outside :mod:`mappers.ucum`, or units of different
                           dimensions (``[lb_av]`` -> ``cm``)
fhirpath-syntax            a FHIRPath expression that does not parse (or evaluate)
wrong-item-type            an observation from a question that is not a quantity
plan-without-medication    a plan with no medication coding
duplicate-plan             one plan id in two checkout profiles
duplicate-processor        one processor in two checkout profiles
unknown-concept-map        a concept map reference with no file in concept-maps/
invalid-extension          an EHR override extension that is not valid FHIR
ownership-conflict         a Patient element owned by both an intake and a checkout
code-syntax                a coding whose code is not of its system's form (RxNorm
                           digits, LOINC ``n-n`` with its check digit, SNOMED CT digits
                           with its Verhoeff check digit) or a ``<...>`` placeholder
                           (:mod:`mappers.codesyntax`)
consent-without-mapping    (warning) a required consent with no ``derived.consents`` entry
unknown-program            (warning) a plan whose program no intake form has
checkout-event-not-in-     (warning) plans are sold but the workflow does not let
workflow                   checkout send ``payment_completed`` or ``payment_deferred``
                           (such a checkout's case event goes to the exceptions queue)
=========================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fhir.resources.R4B.extension import Extension
from pydantic import BaseModel, ValidationError

from mappers import ucum
from mappers.codesyntax import code_syntax_problem
from mappers.errors import Problem
from mappers.fhirpath import compile_fhirpath, fhirpath_syntax_errors, linkids_named
from mappers.profiles.checkout import PAYMENT_EVENTS
from mappers.profiles.intake import IntakeProfile

WARNINGS = frozenset(
    {"consent-without-mapping", "unknown-program", "checkout-event-not-in-workflow"}
)

_Found = tuple[str, tuple[Any, ...], str, str]  # (source key, path, code, message)

_EMPTY_QR: dict[str, Any] = {"resourceType": "QuestionnaireResponse", "status": "completed"}


def lint_profile_set(profiles: Any) -> tuple[list[Problem], list[Problem]]:
    """Lint every profile of a :class:`~mappers.profiles.loader.ProfileSet`.

    Returns:
        ``(errors, warnings)``, each located ``<file>:<line>: <path>``.
    """
    found: list[_Found] = []
    for (pid, version), profile in profiles.intake.items():
        found.extend(_lint_intake(f"intake/{pid}/{version}", profile, profiles.concept_maps))
    found.extend(_lint_checkout(profiles))
    found.extend(_lint_ehr(profiles))
    found.extend(_lint_ownership(profiles))
    found.extend(_lint_code_syntax(profiles))
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for key, path, code, message in found:
        source = profiles.sources.get(key)
        where = source.where(path) if source is not None else key
        (warnings if code in WARNINGS else errors).append(Problem(where, code, message))
    return errors, warnings


def _lint_intake(
    key: str, profile: IntakeProfile, concept_maps: dict[str, Any]
) -> Iterable[_Found]:
    keys: dict[str, tuple[Any, ...]] = {}
    links: dict[str, tuple[Any, ...]] = {}
    for path, item in profile.walk():
        if item.key in keys:
            yield key, (*path, "key"), "duplicate-key", f"answer key {item.key!r} is used twice"
        keys.setdefault(item.key, path)
        if item.linkid in links:
            yield (
                key,
                (*path, "link_id"),
                "duplicate-link-id",
                f"linkId {item.linkid!r} is used twice",
            )
        links.setdefault(item.linkid, path)
        for i, option in enumerate(item.options):
            missing = [n for n in ("system", "code") if not getattr(option, n)]
            if missing:
                yield (
                    key,
                    (*path, "options", i),
                    "choice-without-code",
                    f"answer option {option.display!r} has no {' and no '.join(missing)}",
                )
        if item.type == "quantity":
            unit_fields: list[tuple[tuple[Any, ...], str | None]] = [
                (("unit",), item.unit),
                *((("units", j), u) for j, u in enumerate(item.units)),
                (("convert_to",), item.convert_to),
            ]
            for sub, unit in unit_fields:
                if unit is None:
                    continue
                if ucum.get_unit(unit) is None:
                    yield (
                        key,
                        (*path, *sub),
                        "unknown-ucum-conversion",
                        f"unknown UCUM unit {unit!r}",
                    )
                elif (
                    item.unit and ucum.get_unit(item.unit) and not ucum.can_convert(item.unit, unit)
                ):
                    yield (
                        key,
                        (*path, *sub),
                        "unknown-ucum-conversion",
                        f"no UCUM conversion from {item.unit} to {unit}",
                    )
        if item.synonyms and item.synonyms not in concept_maps:
            yield (
                key,
                (*path, "synonyms"),
                "unknown-concept-map",
                f"no concept map {item.synonyms!r} in concept-maps/",
            )
    by_key = profile.items_by_key
    for path, item in profile.walk():
        for i, cond in enumerate(item.enable_when):
            target = by_key.get(cond.question)
            here = (*path, "enable_when", i)
            if target is None:
                yield (
                    key,
                    (*here, "question"),
                    "unknown-link-id",
                    f"enable_when names unknown question {cond.question!r}",
                )
                continue
            problem = _condition_problem(target, cond.operator, cond.answer)
            if problem:
                yield key, (*here, "answer"), "unknown-answer", problem
    derived = profile.derived
    for i, obs in enumerate(derived.observations):
        here = ("derived", "observations", i)
        if ucum.get_unit(obs.unit) is None:
            yield key, (*here, "unit"), "unknown-ucum-conversion", f"unknown UCUM unit {obs.unit!r}"
        sources = (
            [("from", obs.from_, None)]
            if obs.from_
            else [("weight", obs.weight, "kg"), ("height", obs.height, "m")]
        )
        for field_name, item_key, base in sources:
            source_item = by_key.get(item_key or "")
            if source_item is None:
                yield (
                    key,
                    (*here, field_name),
                    "unknown-link-id",
                    f"observation names unknown question {item_key!r}",
                )
                continue
            if source_item.type != "quantity":
                yield (
                    key,
                    (*here, field_name),
                    "wrong-item-type",
                    f"question {item_key!r} is a {source_item.type}, not a quantity",
                )
                continue
            want = base or obs.unit
            for unit in [source_item.unit, *source_item.units]:
                if (
                    unit
                    and ucum.get_unit(unit)
                    and ucum.get_unit(want)
                    and not ucum.can_convert(unit, want)
                ):
                    yield (
                        key,
                        (*here, field_name),
                        "unknown-ucum-conversion",
                        f"no UCUM conversion from {unit} to {want}",
                    )
        if obs.compute == "bmi" and obs.unit != "kg/m2":
            yield key, (*here, "unit"), "unknown-ucum-conversion", "a BMI is in kg/m2"
    for i, flag in enumerate(derived.flags):
        here = ("derived", "flags", i, "when")
        errors = fhirpath_syntax_errors(flag.when)
        if errors:
            yield key, here, "fhirpath-syntax", f"FHIRPath does not parse: {errors[0]}"
            continue
        try:
            compile_fhirpath(flag.when)(_EMPTY_QR)
        except Exception as exc:  # fhirpathpy raises bare Exception for unknown functions
            yield key, here, "fhirpath-syntax", f"FHIRPath does not evaluate: {exc}"
            continue
        for link in linkids_named(flag.when):
            if link not in links:
                yield key, here, "unknown-link-id", f"FHIRPath names unknown linkId {link!r}"
    for consent in profile.required_consents:
        if derived.consents and consent not in derived.consents:
            yield (
                key,
                ("required_consents",),
                "consent-without-mapping",
                f"consent {consent!r} has no derived.consents entry",
            )


def _condition_problem(item: Any, operator: str, answer: Any) -> str | None:
    if operator == "exists":
        return None if isinstance(answer, bool) else "exists takes answer: true or false"
    if item.type == "boolean":
        if not isinstance(answer, bool) or operator not in ("=", "!="):
            return f"question {item.key!r} is boolean: compare with = or != to true or false"
    elif item.is_choice:
        codes = {o.code for o in item.options}
        if item.type == "choice" and answer not in codes:
            return f"{answer!r} is not an answer code of question {item.key!r}"
    elif item.type in ("integer", "decimal", "quantity"):
        if isinstance(answer, bool) or not isinstance(answer, int | float):
            return f"question {item.key!r} is numeric: compare with a number"
    elif item.type == "group":
        return "enable_when cannot compare a group's answer"
    return None


def _lint_checkout(profiles: Any) -> Iterable[_Found]:
    plan_owner: dict[str, str] = {}
    proc_owner: dict[str, str] = {}
    programs = {p.program for p in profiles.intake.values()}
    for cid, profile in profiles.checkout.items():
        key = f"checkout/{cid}"
        for plan_id, plan in profile.plans.items():
            if plan.medication is None:
                yield (
                    key,
                    ("plans", plan_id),
                    "plan-without-medication",
                    f"plan {plan_id!r} has no medication",
                )
            if plan_id in plan_owner:
                yield (
                    key,
                    ("plans", plan_id),
                    "duplicate-plan",
                    f"plan {plan_id!r} is also in checkout profile {plan_owner[plan_id]}",
                )
            plan_owner.setdefault(plan_id, cid)
            if programs and plan.program not in programs:
                yield (
                    key,
                    ("plans", plan_id, "program"),
                    "unknown-program",
                    f"no intake form has program {plan.program!r}",
                )
        workflow = getattr(profiles, "workflow", None)
        if profile.plans and workflow is not None:
            for event in PAYMENT_EVENTS.values():
                spec = workflow.events.get(event)
                if spec is None or "checkout" not in spec.owners:
                    yield (
                        key,
                        ("plans",),
                        "checkout-event-not-in-workflow",
                        f"the workflow has no event {event!r} owned by checkout: add it "
                        "(see profiles/workflow.yaml as shipped)",
                    )
        for name in profile.processors:
            if name in proc_owner:
                yield (
                    key,
                    ("processors", name),
                    "duplicate-processor",
                    f"processor {name!r} is also in checkout profile {proc_owner[name]}",
                )
            proc_owner.setdefault(name, cid)


def _lint_ehr(profiles: Any) -> Iterable[_Found]:
    for name, target in profiles.ehr.items():
        key = f"ehr/{name}"
        for i, tr in enumerate(target.overrides.code_translations):
            if tr.concept_map not in profiles.concept_maps:
                yield (
                    key,
                    ("overrides", "code_translations", i, "concept_map"),
                    "unknown-concept-map",
                    f"no concept map {tr.concept_map!r} in concept-maps/",
                )
        for i, ext in enumerate(target.overrides.extensions):
            try:
                Extension.model_validate(ext.extension)
            except ValidationError as exc:
                first = exc.errors(include_input=False, include_url=False)[0]
                loc = ".".join(str(p) for p in first["loc"])
                yield (
                    key,
                    ("overrides", "extensions", i, "extension"),
                    "invalid-extension",
                    f"not a valid FHIR Extension ({loc}: {first['msg']})",
                )


def _lint_ownership(profiles: Any) -> Iterable[_Found]:
    intake_owner: dict[str, str] = {}
    for (pid, version), profile in profiles.intake.items():
        for element in profile.patient.owns:
            intake_owner.setdefault(element, f"intake/{pid}/{version}")
    for cid, profile in profiles.checkout.items():
        for i, element in enumerate(profile.patient.owns):
            if element in intake_owner:
                yield (
                    f"checkout/{cid}",
                    ("patient", "owns", i),
                    "ownership-conflict",
                    f"Patient element {element} is also owned by {intake_owner[element]}: "
                    "one source must own it",
                )


def _lint_code_syntax(profiles: Any) -> Iterable[_Found]:
    """Every ``{system, code}`` pair of the intake, checkout and EHR profiles, checked by
    :func:`mappers.codesyntax.code_syntax_problem`."""
    keyed: list[tuple[str, Any]] = [
        (f"intake/{pid}/{version}", p) for (pid, version), p in profiles.intake.items()
    ]
    keyed += [(f"checkout/{cid}", p) for cid, p in profiles.checkout.items()]
    keyed += [(f"ehr/{name}", p) for name, p in profiles.ehr.items()]
    for key, profile in keyed:
        for path, system, code in _codings(profile, ()):
            message = code_syntax_problem(system, code)
            if message is not None:
                yield key, (*path, "code"), "code-syntax", f"{system}: {message}"


def _codings(node: Any, path: tuple[Any, ...]) -> Iterable[tuple[tuple[Any, ...], str, str]]:
    """``(path, system, code)`` of every model in ``node`` with a string ``system`` and
    ``code`` (paths as written in the YAML: field aliases, mapping keys, list indexes)."""
    if isinstance(node, BaseModel):
        system, code = getattr(node, "system", None), getattr(node, "code", None)
        if isinstance(system, str) and isinstance(code, str):
            yield path, system, code
        for name, info in type(node).model_fields.items():
            yield from _codings(getattr(node, name), (*path, info.alias or name))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _codings(v, (*path, k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _codings(v, (*path, i))
