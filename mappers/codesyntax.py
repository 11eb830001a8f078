"""The syntax of a code in the code systems the profiles use most, checked before a code
reaches an EHR (``profiles check`` and every profile load; :mod:`mappers.profiles.lint`).

Only the form is checked, not that the code exists (that needs the terminology itself):

* RxNorm (``http://www.nlm.nih.gov/research/umls/rxnorm``): an RxCUI, digits only
  (https://www.nlm.nih.gov/research/umls/rxnorm/docs/techdoc.html, "RXCUI").
* LOINC (``http://loinc.org``): ``<digits>-<check digit>``, the check digit by LOINC's
  mod-10 algorithm (LOINC Users' Guide, appendix "Calculating Mod 10 check digits"; the
  same sums as Luhn over the part before the hyphen): ``29463-7`` is valid, ``29463-8`` not.
* SNOMED CT (``http://snomed.info/sct``): an SCTID, 6 to 18 digits without a leading
  zero, the last one a Verhoeff check digit (SNOMED CT Technical Implementation Guide,
  "SCTID" and "Check-digit"): ``44054006`` is valid, ``44054007`` not.

A placeholder such as ``<the SCD RxCUI of the 2.4 mg pen, from RxNav>`` (as the guide's
plans are written before an analyst looks the code up) is refused in every system.
"""

from __future__ import annotations

import re

from stdnum import luhn, verhoeff

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED_CT = "http://snomed.info/sct"

_LOINC = re.compile(r"[0-9]{1,7}-[0-9]")
_SCTID = re.compile(r"[1-9][0-9]{5,17}")
_RXCUI = re.compile(r"[0-9]{1,10}")


def code_syntax_problem(system: str, code: str) -> str | None:
    """Why ``code`` cannot be a code of ``system``, or None when its form is right (or the
    system is not one checked here, except for placeholders).

    Returns a message that names the rule, never the code itself.
    """
    if code.startswith("<") or code.endswith(">"):
        return "a placeholder (<...>), not a code: look the code up and put it here"
    if system == RXNORM and not _RXCUI.fullmatch(code):
        return "an RxNorm code (RxCUI) is digits only"
    if system == LOINC:
        if not _LOINC.fullmatch(code):
            return "a LOINC code is <digits>-<check digit> (such as 29463-7)"
        if not luhn.is_valid(code.replace("-", "")):
            return "the LOINC check digit (after the hyphen) does not match the number"
    if system == SNOMED_CT:
        if not _SCTID.fullmatch(code):
            return "a SNOMED CT code is 6 to 18 digits, not starting with 0"
        if not verhoeff.is_valid(code):
            return "the SNOMED CT check digit (the last, Verhoeff) does not match"
    return None
