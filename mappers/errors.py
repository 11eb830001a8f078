"""Mapping errors: every problem named by location and code, never by value.

Error tree::

    MappingError            one problem (location + code + message), never the input value
    MappingErrors           several problems found in one payload; raised once, after
                            collecting, so callers can report every problem at the same time

The message never contains the rejected value: values are PHI (names, dates, phones).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem with an input.

    Attributes:
        location: where in the input, as a dotted path with list indexes
            (``patient.address.state``, ``answers.weight_lb``, ``consents[0].accepted_at``);
            empty for the payload as a whole.
        code: a stable machine-readable code (``invalid_phone``, ``unknown_question``).
        message: a sentence for a human, which never repeats the input value.
    """

    location: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """Return ``{"location": ..., "code": ..., "message": ...}``."""
        return {"location": self.location, "code": self.code, "message": self.message}


class MappingError(ValueError):
    """One input problem; carries a location and a code, never the value."""

    def __init__(self, code: str, message: str, location: str = "") -> None:
        super().__init__(message)
        self.problem = Problem(location=location, code=code, message=message)

    @property
    def code(self) -> str:
        """The stable problem code."""
        return self.problem.code

    @property
    def location(self) -> str:
        """The input path of the problem."""
        return self.problem.location

    def at(self, location: str) -> MappingError:
        """Return a copy of this error placed at ``location`` (for nested callers)."""
        return MappingError(self.problem.code, self.problem.message, location)


class MappingErrors(ValueError):
    """Every problem found in one payload; the payload must be rejected whole."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the input")

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


class ProblemCollector:
    """Collects problems while mapping so that all of them are reported at once.

    Usage::

        problems = ProblemCollector()
        phone = problems.run("patient.phone", normalize_phone, raw_phone)
        ...
        problems.raise_if_any()   # raises MappingErrors listing every problem
    """

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        #: Warnings: a value accepted with a change the sender should know of (a time of
        #: day dropped from a date). They never make the payload fail.
        self.notes: list[Problem] = []

    def add(self, location: str, code: str, message: str) -> None:
        """Record one problem."""
        self.problems.append(Problem(location=location, code=code, message=message))

    def note(self, location: str, code: str, message: str) -> None:
        """Record one warning (see :attr:`notes`)."""
        self.notes.append(Problem(location=location, code=code, message=message))

    def run(self, location: str, func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Call ``func(*args, **kwargs)``; on :class:`MappingError` record it at ``location``.

        Returns the function's result, or ``None`` when it raised a MappingError.
        """
        try:
            return func(*args, **kwargs)
        except MappingErrors as exc:
            for p in exc.problems:
                loc = (
                    f"{location}.{p.location}"
                    if p.location and location
                    else (p.location or location)
                )
                self.add(loc, p.code, p.message)
        except MappingError as exc:
            self.add(exc.location or location, exc.code, str(exc))
        return None

    def raise_if_any(self) -> None:
        """Raise :class:`MappingErrors` if any problem was recorded."""
        if self.problems:
            raise MappingErrors(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)
