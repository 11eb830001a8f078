"""FHIRPath (http://hl7.org/fhirpath/N1/) for profile rules, with fhirpathpy.

fhirpathpy's ``compile`` recovers from syntax errors silently (an unbalanced
``where(`` still compiles), so :func:`fhirpath_syntax_errors` parses with the same ANTLR
grammar (``entireExpression: expression EOF``) and an error listener that records every
syntax error. Expressions are evaluated with the R4 model so choice elements resolve
(``answer.value`` finds ``valueBoolean``/``valueCoding``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy import compile as fp_compile
from fhirpathpy.models import models
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from mappers.errors import MappingError

Evaluator = Callable[[dict[str, Any]], list[Any]]

_LINK_ID = re.compile(r"linkId\s*=\s*'([^']*)'")


class _Collect(ErrorListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.errors: list[str] = []

    def syntaxError(
        self, recognizer: Any, offendingSymbol: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        self.errors.append(f"column {column + 1}: {msg}")


def fhirpath_syntax_errors(expression: str) -> list[str]:
    """Every syntax error of ``expression`` (``column <n>: <message>``); empty if it parses."""
    listener = _Collect()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.entireExpression()  # type: ignore[no-untyped-call]
    return listener.errors


def compile_fhirpath(expression: str) -> Evaluator:
    """Compile ``expression`` for repeated evaluation over R4 JSON resources.

    Raises:
        MappingError: ``fhirpath_syntax`` naming the first syntax error.
    """
    errors = fhirpath_syntax_errors(expression)
    if errors:
        raise MappingError("fhirpath_syntax", f"FHIRPath does not parse ({errors[0]})")
    fn = fp_compile(expression, models["r4"])

    def evaluate(resource: dict[str, Any]) -> list[Any]:
        return list(fn(resource, {}))

    return evaluate


def is_true(result: list[Any]) -> bool:
    """FHIRPath singleton evaluation to boolean (http://hl7.org/fhirpath/N1/#singleton-evaluation-of-collections):
    ``[true]`` is true; empty or ``[false]`` is false; any other single item is true."""
    if not result:
        return False
    if len(result) == 1:
        return result[0] is not False
    return True


def linkids_named(expression: str) -> list[str]:
    """The linkIds an expression compares against literally (``linkId = 'x'``), for lint."""
    return _LINK_ID.findall(expression)
