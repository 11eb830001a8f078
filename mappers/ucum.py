"""UCUM units the profiles may use, and exact conversions between them.

A deliberately small table: the units intake forms and vital signs need, each with its
dimension and its exact factor to the dimension's base unit, as UCUM defines them
(https://ucum.org/ucum, "Units of measure" tables; e.g. ``[lb_av] = 7000 [gr]`` and
``[gr] = 64.79891 mg``, so ``1 [lb_av] = 0.45359237 kg`` exactly; ``[in_i] = 2.54 cm``
exactly). A unit outside this table is an "unknown UCUM conversion" for
``profiles check``; add it here with its UCUM definition to support it.

Values are :class:`~decimal.Decimal` so conversions are exact until the final rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from mappers.errors import MappingError

UCUM_SYSTEM = "http://unitsofmeasure.org"


@dataclass(frozen=True, slots=True)
class Unit:
    """One UCUM unit: its case-sensitive code, a display, its dimension and its factor
    to the dimension's base unit (kg, m, kg/m2, s, L, mg/dL, %...)."""

    code: str
    display: str
    dimension: str
    factor: Decimal


def _u(code: str, display: str, dimension: str, factor: str) -> Unit:
    return Unit(code, display, dimension, Decimal(factor))


#: The supported units by UCUM code.
UNITS: dict[str, Unit] = {
    u.code: u
    for u in [
        # mass (base kg)
        _u("kg", "kg", "mass", "1"),
        _u("g", "g", "mass", "0.001"),
        _u("mg", "mg", "mass", "0.000001"),
        _u("[lb_av]", "lb", "mass", "0.45359237"),
        _u("[oz_av]", "oz", "mass", "0.028349523125"),
        # length (base m)
        _u("m", "m", "length", "1"),
        _u("cm", "cm", "length", "0.01"),
        _u("mm", "mm", "length", "0.001"),
        _u("[in_i]", "in", "length", "0.0254"),
        _u("[ft_i]", "ft", "length", "0.3048"),
        # body mass index (base kg/m2)
        _u("kg/m2", "kg/m2", "mass/area", "1"),
        # volume (base L)
        _u("L", "L", "volume", "1"),
        _u("mL", "mL", "volume", "0.001"),
        # time (base s)
        _u("s", "s", "time", "1"),
        _u("min", "min", "time", "60"),
        _u("h", "h", "time", "3600"),
        _u("d", "d", "time", "86400"),
        _u("wk", "wk", "time", "604800"),
        # others used as plain units (no conversion partners needed)
        _u("%", "%", "fraction", "0.01"),
        _u("mm[Hg]", "mmHg", "pressure", "1"),
        _u("/min", "/min", "rate", "1"),
        _u("{count}", "count", "count", "1"),
    ]
}


def get_unit(code: str) -> Unit | None:
    """The unit with UCUM ``code`` (case-sensitive, as UCUM is), or None."""
    return UNITS.get(code)


def can_convert(source: str, target: str) -> bool:
    """True when both units are known and measure the same dimension."""
    a, b = UNITS.get(source), UNITS.get(target)
    return a is not None and b is not None and a.dimension == b.dimension


def convert(value: Decimal, source: str, target: str, *, decimals: int = 2) -> Decimal:
    """Convert ``value`` from UCUM unit ``source`` to ``target``.

    Args:
        value: the quantity in ``source`` units.
        source: UCUM code, e.g. ``[lb_av]``.
        target: UCUM code, e.g. ``kg``.
        decimals: digits after the decimal point of the result (banker's rounding).

    Returns:
        The converted value, e.g. ``convert(Decimal(212), "[lb_av]", "kg") == Decimal("96.16")``.

    Raises:
        MappingError: ``unknown_unit_conversion`` when either unit is unknown or the
            dimensions differ.
    """
    if source == target:
        return value
    if not can_convert(source, target):
        raise MappingError(
            "unknown_unit_conversion", f"no UCUM conversion from {source} to {target}"
        )
    factor = UNITS[source].factor / UNITS[target].factor
    return (value * factor).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)
