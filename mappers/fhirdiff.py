"""Path-level differences between two FHIR JSON documents (golden files, re-maps).

One line per difference, FHIRPath-like, values as compact JSON::

    QuestionnaireResponse/6a1f....item[3].answer[0].valueCoding.code: -"Y" +"N"
    Observation/8c2d....valueQuantity.value: -96.16 +96.2
    Flag/1b9e...: +{"resourceType":"Flag",...}            (only in the new output)

Lists are compared by position (FHIR arrays are ordered). Resources are paired by
``resourceType/id`` (the mappers' ids are deterministic, so a re-map or a golden
example pairs exactly). The lines hold values: the golden files are synthetic; the re-map
diff is shown to an operator on a terminal and must never be logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def json_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Every difference between ``old`` and ``new`` as ``<path>: -<old> +<new>`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            here = f"{path}.{key}" if path else key
            if key not in new:
                out.append(f"{here}: -{_dump(old[key])}")
            elif key not in old:
                out.append(f"{here}: +{_dump(new[key])}")
            else:
                out.extend(json_diff(old[key], new[key], here))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        for i in range(max(len(old), len(new))):
            here = f"{path}[{i}]"
            if i >= len(new):
                out.append(f"{here}: -{_dump(old[i])}")
            elif i >= len(old):
                out.append(f"{here}: +{_dump(new[i])}")
            else:
                out.extend(json_diff(old[i], new[i], here))
        return out
    if old == new and type(old) is type(new):
        return []
    return [f"{path or '.'}: -{_dump(old)} +{_dump(new)}"]


def _key(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def resources_diff(
    old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], *, ignore_meta: bool = True
) -> list[str]:
    """Differences between two sets of resources, paired by ``resourceType/id``.

    Args:
        old: e.g. the expected (golden) resources, or what was produced and stored.
        new: e.g. the actual mapping output, or the re-mapped resources.
        ignore_meta: leave out ``meta.versionId`` and ``meta.lastUpdated`` (set by storage).
    """
    olds = {_key(r): _clean(r, ignore_meta) for r in old}
    news = {_key(r): _clean(r, ignore_meta) for r in new}
    out: list[str] = []
    for key in list(olds) + [k for k in news if k not in olds]:
        if key not in news:
            out.append(f"{key}: -{_dump(olds[key])}")
        elif key not in olds:
            out.append(f"{key}: +{_dump(news[key])}")
        else:
            out.extend(f"{key}.{line}" for line in json_diff(olds[key], news[key]))
    return out


def _clean(resource: dict[str, Any], ignore_meta: bool) -> dict[str, Any]:
    if not ignore_meta or "meta" not in resource:
        return resource
    out = dict(resource)
    meta = {k: v for k, v in resource["meta"].items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        del out["meta"]
    return out
