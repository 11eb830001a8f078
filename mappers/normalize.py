"""Normalise messy intake values (phones, states, ZIPs, dates, emails, names, timestamps).

Every function takes the raw string a patient or partner typed and returns the one canonical
form the FHIR mappers emit, or raises :class:`mappers.errors.MappingError` with a stable
``code``. Messages say what was expected and never repeat the input, which is PHI. Callers
add the location (``ProblemCollector.run("patient.phone", normalize_phone, raw)``).

Codes raised, by function::

    normalize_phone          missing_phone, invalid_phone           (parse_phone too)
    normalize_state          missing_state, invalid_state
    normalize_postal_code    missing_postal_code, invalid_postal_code
    normalize_birth_date     missing_date, incomplete_date, ambiguous_date, invalid_date,
                             birth_date_in_future, birth_date_too_old (parse_birth_date too)
    normalize_date           missing_date, incomplete_date, ambiguous_date, invalid_date
                                                                    (parse_date too)
    normalize_email          missing_email, invalid_email
    normalize_name           missing_name, invalid_name
    parse_datetime           missing_datetime, missing_timezone, invalid_datetime
    to_fhir_instant          missing_timezone, invalid_datetime

Every function first deletes invisible format characters (zero-width space, BOM, soft
hyphen, bidirectional marks; see :func:`_visible`) that copy-paste brings along.

These run on the intake hot path: regexes are compiled and lookup tables built once at
import, and the accepted inputs go through without raising and catching exceptions.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import idna
import phonenumbers
from us import states as us_states

from mappers.errors import MappingError

__all__ = [
    "DateOrder",
    "ParsedDate",
    "PhoneNumber",
    "normalize_birth_date",
    "normalize_date",
    "normalize_email",
    "normalize_name",
    "normalize_phone",
    "normalize_postal_code",
    "normalize_state",
    "parse_birth_date",
    "parse_date",
    "parse_datetime",
    "parse_phone",
    "to_fhir_instant",
]

# --------------------------------------------------------------------------------------------
# Invisible characters
# --------------------------------------------------------------------------------------------

# Invisible format characters that copy-paste from web pages, PDFs, chat apps and
# right-to-left text brings along: zero-width space, word joiner, BOM / zero-width no-break
# space, soft hyphen, and the bidirectional marks, embeddings and isolates. They carry no
# meaning in a name, phone, email, ZIP, state or date, yet make two spellings of the same
# value compare different (EHR matching is exact). Deleted everywhere. The zero-width
# joiner and non-joiner (U+200D, U+200C) do carry meaning inside words (emoji sequences,
# Persian and Indic scripts), so they are only trimmed at the ends (:func:`_visible`).
_INVISIBLE = dict.fromkeys(
    map(
        ord,
        "\u00ad\u180e\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
        "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff",
    )
)
_JOINERS = "\u200c\u200d"


def _visible(raw: str) -> str:
    """``raw`` without invisible format characters, trimmed of whitespace and joiners.

    Spec: Unicode general category Cf (https://www.unicode.org/reports/tr44/#General_Category_Values).
    """
    text = raw.translate(_INVISIBLE)
    return text.strip().strip(_JOINERS).strip()


# --------------------------------------------------------------------------------------------
# Phone
# --------------------------------------------------------------------------------------------

# An extension at the end, in the spellings libphonenumber parses in English and RFC 3966:
# "x123", "ext. 5", "extn 5", "extension 22", "#5", ",5", ";ext=5". Only used to set the
# extension aside before looking for letters in the number itself; phonenumbers parses it.
_PHONE_EXTENSION_TAIL_RE = re.compile(
    r"(?:;\s*ext\s*=|(?:ext(?:ension|n)?|x)\.?\s*:?|[#,;])\s*[0-9]+\s*#?\s*$", re.IGNORECASE
)
_TEL_URI_RE = re.compile(r"\s*tel:", re.IGNORECASE)
_LETTER_OR_DIGIT_RE = re.compile(r"[^\W_]")
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
_POSSIBLE = frozenset(
    {
        phonenumbers.ValidationResult.IS_POSSIBLE,
        phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    }
)


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A telephone number in E.164 and the extension dialled after it, if any.

    Attributes:
        e164: ``+`` and the country code and national number, e.g. ``+14155552671``.
        extension: the extension's digits as typed (``"12"``, ``"0012"``), or None.
    """

    e164: str
    extension: str | None = None

    @property
    def text(self) -> str:
        """The number as one string: ``+14155552671``, or with its extension as the RFC 3966
        parameter, ``+14155552671;ext=12`` (how the canonical contracts carry it)."""
        return f"{self.e164};ext={self.extension}" if self.extension else self.e164

    @classmethod
    def from_text(cls, text: str) -> PhoneNumber:
        """The inverse of :attr:`text` (for a value :func:`normalize_phone` returned)."""
        number, _, extension = text.partition(";ext=")
        return cls(number, extension or None)


def parse_phone(raw: str, *, default_region: str = "US") -> PhoneNumber:
    """Parse a telephone number with libphonenumber into E.164 and an extension.

    Accepts what libphonenumber (``phonenumbers.parse``) makes a *valid* number of (valid for
    its region per libphonenumber metadata, not only of a possible length: ``555-1234``
    would otherwise format as ``+15551234``):

    * national US forms (``(415) 555-2671``, ``415.555.2671``, ``1-415-555-2671``),
      international forms with ``+`` (``+44 20 7946 0958``) or ``default_region``'s
      international dialling prefix (``011 44 ...`` for the US), Unicode dashes and
      non-ASCII digits;
    * an extension after the number: ``x12``, ``ext. 12``, ``extension 12``, ``#12``,
      ``,12`` (a dialler's pause), kept apart from the number;
    * RFC 3966 ``tel:`` URIs, global (``tel:+1-415-555-2671;ext=12``) or local with a
      ``phone-context`` (``tel:555-2671;phone-context=+1-415``);
    * vanity numbers, whose letters are keypad digits (``1-800-FLOWERS`` is
      ``+18003569377``, ITU-T E.161), and a label before the number (``cell: 415...``),
      which libphonenumber skips.

    Letters *after* a complete number (``415-555-2671 home``, or ``212-2671 cel``, a 7-digit
    local number) are refused even where libphonenumber would read them as keypad digits:
    they are a word the patient added, and the digits they make would be a different number.

    Spec: ITU-T E.164; RFC 3966 (``tel`` URI, ``ext`` parameter); ITU-T E.161 (letters on
    the keypad). FHIR only recommends a leading ``+`` in ``ContactPoint.value``; E.164 is the
    gateway's choice so that EHR-side matching is exact.

    Args:
        raw: the number as typed.
        default_region: ISO 3166-1 alpha-2 region used when ``raw`` has no ``+``.

    Returns:
        The :class:`PhoneNumber`.

    Raises:
        MappingError: ``missing_phone`` when empty or blank; ``invalid_phone`` when
            libphonenumber cannot make a valid number of it (too short, too long, an
            unassigned area code or exchange, free text), or words follow the number.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_phone", "A phone number is required.")
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise _invalid_phone_error() from exc
    if _words_after_number(text, default_region):
        raise MappingError(
            "invalid_phone",
            "Expected a phone number without words after it: letters are read as keypad "
            "digits only where they complete the number, as in a vanity number.",
        )
    if not phonenumbers.is_valid_number(number):
        reason = phonenumbers.is_possible_number_with_reason(number)
        if reason == phonenumbers.ValidationResult.IS_POSSIBLE:
            # Right length, but no such area code or exchange ("(555) 123-4567"): saying
            # "10 digits expected" to someone who typed 10 digits would not help them.
            raise MappingError(
                "invalid_phone",
                "Expected a phone number in service: this one has the right number of "
                "digits, but its area code or exchange is not assigned.",
            )
        raise _invalid_phone_error()
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return PhoneNumber(e164, number.extension or None)


def normalize_phone(raw: str, *, default_region: str = "US") -> str:
    """Normalise a telephone number to E.164, with its extension as ``;ext=``.

    See :func:`parse_phone` for what is accepted and refused.

    Returns:
        ``+14155552671``, or ``+14155552671;ext=12`` when an extension was given
        (:attr:`PhoneNumber.text`; :func:`mappers.patient.phone_contact_point` turns it into a
        ContactPoint).

    Raises:
        MappingError: ``missing_phone`` or ``invalid_phone``, as :func:`parse_phone`.
    """
    return parse_phone(raw, default_region=default_region).text


def _words_after_number(text: str, region: str) -> bool:
    """True when letters follow digits that already make a possible number by themselves.

    A vanity number's letters replace digits the number still needs (``1-800-`` is not a
    number yet); a word after ``415-555-2671`` or ``555-2671`` does not.
    """
    uri = _TEL_URI_RE.match(text)
    if uri is not None:
        number_part = text[uri.end() :].split(";", 1)[0]
    else:
        number_part = _PHONE_EXTENSION_TAIL_RE.sub("", text)
    first = _LETTER_OR_DIGIT_RE.search(number_part)
    while first is not None and not first.group().isdigit():
        # a label before the number ("cell: ...") is skipped, as libphonenumber does
        first = _LETTER_OR_DIGIT_RE.search(number_part, first.end())
    if first is None:
        return False
    letter = _ASCII_LETTER_RE.search(number_part, first.start())
    if letter is None:
        return False
    head = number_part[: letter.start()]
    try:
        reason = phonenumbers.is_possible_number_with_reason(phonenumbers.parse(head, region))
    except phonenumbers.NumberParseException:
        return False
    return reason in _POSSIBLE


def _invalid_phone_error() -> MappingError:
    return MappingError(
        "invalid_phone",
        "Expected a valid phone number: 10 digits for a US number, or '+' and the country "
        "code for an international one.",
    )


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

# Characters ignored when comparing state names and codes: "N.Y.", "Washington, D.C." and
# "New  York" compare equal to "ny", "washingtondc" and "newyork".
_STATE_IGNORED_RE = re.compile(r"[\s.,]+")

# USPS Publication 28, Appendix B: military "state" codes for APO/FPO/DPO addresses. They are
# not in the `us` package.
_MILITARY_STATES: dict[str, tuple[str, ...]] = {
    "AA": ("Armed Forces Americas", "Armed Forces the Americas"),
    "AE": (
        "Armed Forces Europe",
        "Armed Forces Africa",
        "Armed Forces Canada",
        "Armed Forces Middle East",
    ),
    "AP": ("Armed Forces Pacific",),
}

# Common names the `us` data does not carry.
_STATE_ALIASES: dict[str, tuple[str, ...]] = {
    "DC": ("Washington DC", "Washington D.C.", "Washington District of Columbia"),
    "HI": ("Hawai'i", "Hawai\u02bbi"),
    "MP": ("Commonwealth of the Northern Mariana Islands", "CNMI"),
    "PR": ("Commonwealth of Puerto Rico",),
    "VI": (
        "US Virgin Islands",
        "U.S. Virgin Islands",
        "United States Virgin Islands",
        "Virgin Islands of the United States",
        "USVI",
    ),
    "FM": ("Micronesia",),
    "WA": ("Washington State",),
}

# Traditional abbreviations with periods that the `us` data (AP style) does not carry: the
# U.S. Government Publishing Office Style Manual's list (chapter 9, "Abbreviations and letter
# symbols": Tex., Nebr., Oreg., N. Mex., Wis.) and older forms still seen on forms (Penna.,
# Wisc., Kans.). Letters only, so they never collide with another state's code.
_TRADITIONAL_ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "CA": ("Cal.",),
    "CO": ("Col.",),
    "ID": ("Ida.",),
    "IL": ("Ills.",),
    "KS": ("Kans.", "Kas."),
    "NE": ("Nebr.",),
    "NM": ("N. Mex.",),
    "NC": ("N. Car.",),
    "ND": ("N. Dak.",),
    "OR": ("Oreg.",),
    "PA": ("Penn.", "Penna."),
    "SC": ("S. Car.",),
    "SD": ("S. Dak.",),
    "TX": ("Tex.",),
    "WI": ("Wisc.",),
}

#: Shortest misspelt name corrected (``Ohoi``, ``Iwoa``): in shorter text one edit is too
#: much of the word to be sure.
_STATE_TYPO_MIN_LENGTH = 4


def _state_key(text: str) -> str:
    return _STATE_IGNORED_RE.sub("", text).casefold()


def _state_places() -> list[us_states.State]:
    # DC and the freely associated states are listed explicitly: whether DC is in
    # STATES_AND_TERRITORIES has depended on the `us` version and on the DC_STATEHOOD
    # environment variable, and FM, MH and PW are in USPS Publication 28 but only in
    # ASSOCIATED_STATES.
    places = [*us_states.STATES_AND_TERRITORIES, us_states.DC, *us_states.ASSOCIATED_STATES]
    return [place for place in places if not place.is_obsolete]


def _build_state_table() -> dict[str, str]:
    """Map every accepted spelling (as :func:`_state_key`) to its USPS code.

    Exact keys: `us.states.lookup` matches names by metaphone, so it turns ``Teksis`` into
    Texas, a guess we must not make with a patient's address (misspellings are handled by
    :func:`_state_within_one_edit`, which is much narrower).
    """
    table: dict[str, str] = {}

    def add(code: str, spellings: Iterable[str]) -> None:
        for spelling in spellings:
            key = _state_key(spelling)
            if table.setdefault(key, code) != code:
                raise RuntimeError(f"state spelling {spelling!r} maps to two USPS codes")

    for place in _state_places():
        spellings = [place.abbr, place.name]
        if place.ap_abbr:
            spellings.append(place.ap_abbr)
        add(place.abbr, spellings)
    for code, names in _MILITARY_STATES.items():
        add(code, (code, *names))
    for code, names in (*_STATE_ALIASES.items(), *_TRADITIONAL_ABBREVIATIONS.items()):
        add(code, names)
    return table


_STATE_CODES: dict[str, str] = _build_state_table()
#: FIPS PUB 5-2 / INCITS 38 numeric codes (two digits, from the `us` data): 06 -> CA.
_STATE_FIPS: dict[str, str] = {p.fips: p.abbr for p in _state_places() if p.fips}
#: The names a misspelling may be corrected to: full names, not codes or abbreviations.
_STATE_NAMES: tuple[tuple[str, str], ...] = tuple(
    (_state_key(name), code)
    for code, name in [
        *((p.abbr, p.name) for p in _state_places()),
        *((code, n) for code, names in _MILITARY_STATES.items() for n in names),
        *((code, n) for code, names in _STATE_ALIASES.items() for n in names if not n.isupper()),
    ]
)


def _one_edit_apart(a: str, b: str) -> bool:
    """True when ``b`` is ``a`` with one letter inserted, deleted, replaced, or two
    neighbouring letters swapped (optimal string alignment distance 1)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
        )
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long[i]:
        i += 1
    return short[i:] == long[i + 1 :]


def _state_within_one_edit(key: str) -> set[str]:
    """The USPS codes of the state names one edit away from ``key`` (letters only)."""
    if len(key) < _STATE_TYPO_MIN_LENGTH or not key.isalpha():
        return set()
    return {code for name, code in _STATE_NAMES if _one_edit_apart(key, name)}


def normalize_state(raw: str) -> str:
    """Normalise a US state, district, territory or military code to its USPS code.

    Accepts, in any case and with extra spaces, periods or commas:

    * two-letter USPS codes (``tx``, ``N.Y.``, ``D.C.``), including the territories (AS,
      GU, MP, PR, VI), the freely associated states (FM, MH, PW) and the military codes AA,
      AE and AP;
    * full names (``New  York``, ``district of columbia``, ``Washington DC``,
      ``Puerto Rico``, ``Armed Forces Europe``);
    * abbreviations with periods: AP style (``Calif.``, ``W.Va.``) and the traditional GPO
      forms (``Tex.``, ``Nebr.``, ``N. Mex.``, ``Penna.``);
    * two-digit FIPS state codes (``06`` California, ``25`` Massachusetts, ``72`` Puerto
      Rico; FIPS PUB 5-2, as in Census and CMS files);
    * a name with one typo (a letter added, missing, wrong, or two neighbouring letters
      swapped: ``Texs``, ``Calfornia``, ``Virgina``, ``Ohoi``) when exactly one state's
      name is that close, the text has only letters and at least 4 of them.

    Anything else is refused, never guessed: a misspelt code (``TXX``), a name two edits
    away, one typo that is as close to two names, a one-digit or unknown FIPS code.

    Spec: USPS Publication 28, Appendix B; US Core binds ``Patient.address.state`` to the
    USPS code system (``us-core-usps-state``, extensible); FIPS PUB 5-2.

    Args:
        raw: the state as typed.

    Returns:
        The two-letter USPS code in upper case, e.g. ``TX``.

    Raises:
        MappingError: ``missing_state`` when empty or blank; ``invalid_state`` when it is not
            a known USPS code, FIPS code or name, nor one typo away from exactly one name
            (``XX``, ``Ontario``, ``Tejas``, ``6``).
    """
    key = _state_key(_visible(raw))
    if not key:
        raise MappingError("missing_state", "A US state is required.")
    code = _STATE_CODES.get(key) or _STATE_FIPS.get(key)
    if code is not None:
        return code
    close = _state_within_one_edit(key)
    if len(close) == 1:
        return close.pop()
    if close:
        raise MappingError(
            "invalid_state",
            "Expected a US state: this is one typo away from more than one state's name, "
            "so which one is meant is not known.",
        )
    raise MappingError(
        "invalid_state",
        "Expected a USPS two-letter code, a two-digit FIPS code, or the name of a US state, "
        "territory or military region.",
    )


# --------------------------------------------------------------------------------------------
# Postal code
# --------------------------------------------------------------------------------------------

# ASCII digits only: \d would also accept Arabic-Indic and full-width digits.
_ZIP_RE = re.compile(r"([0-9]{5})(?:(?:\s*-\s*|\s*)([0-9]{4}))?")


def normalize_postal_code(raw: str) -> str:
    """Normalise a US ZIP or ZIP+4 code.

    Accepts ``12345``, ``12345-6789``, ``12345 6789`` and ``123456789`` with surrounding
    whitespace. Only US ZIP codes are accepted.

    Spec: USPS ZIP Code and ZIP+4 formats (Publication 28); FHIR ``Address.postalCode``.

    Args:
        raw: the ZIP code as typed.

    Returns:
        ``12345`` or ``12345-6789``.

    Raises:
        MappingError: ``missing_postal_code`` when empty or blank; ``invalid_postal_code``
            for anything else that is not 5 or 9 digits, and for the all-zero placeholder
            ``00000``, which is not a ZIP code.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_postal_code", "A ZIP code is required.")
    match = _ZIP_RE.fullmatch(text)
    if match is None or match.group(1) == "00000":
        raise MappingError(
            "invalid_postal_code",
            "Expected a US ZIP code: 5 digits, or ZIP+4 as 5 digits, a dash and 4 digits.",
        )
    zip5, plus4 = match.groups()
    return f"{zip5}-{plus4}" if plus4 else zip5


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------

#: The order of day, month and year in numeric dates whose numbers alone do not say it
#: (``01/02/2003``): month first, day first, or year first.
DateOrder = Literal["MDY", "DMY", "YMD"]

_BIRTH_DATE_MAX_AGE_YEARS = 130

# Year first: 1990-04-01, 1990/04/01, 1990.4.1, 1990 4 1 (one separator throughout).
_YMD_RE = re.compile(r"([0-9]{4})([-/. ])([0-9]{1,2})\2([0-9]{1,2})")
# Year last: 04/01/1990, 25.09.2003, 4-1-1990 (month or day first: see _year_last_date).
_YEAR_LAST_RE = re.compile(r"([0-9]{1,2})([-/. ])([0-9]{1,2})\2([0-9]{4})")
# Spaces around a numeric separator: "04 / 01 / 1990".
_SPACED_SEPARATOR_RE = re.compile(r"\s*([-/.])\s*")
# ISO 8601 basic: 19900401.
_COMPACT_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
# ISO 8601 / RFC 3339 date-time: groups are year, month, day, hour, minute, second, fraction,
# "Z", offset sign, offset hours, offset minutes. Shared with parse_datetime.
_ISO_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
# A local time after any other date form: "9/25/2003 10:49", "25 Sep 2003, 10:49:07",
# "9/25/2003 12:00:00 AM" (spreadsheet exports). Groups: date, hour, minute, second,
# fraction, a/p.
_TRAILING_TIME_RE = re.compile(
    r"(.+?)[\s,]+(?:at\s+)?([0-9]{1,2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"(?:\s*([AaPp])\.?\s*[Mm]\.?)?",
    re.IGNORECASE,
)
_MAX_OFFSET_HOURS = 14  # UTC+14 (Line Islands) and UTC-12 are the real extremes
# The UTC offsets in use, in minutes (-12:00 to +14:00; every real one is a multiple of 15).
_REAL_OFFSETS_MIN = range(-12 * 60, 14 * 60 + 1, 15)
_MINUTES_PER_DAY = 24 * 60
# Two-digit years (04/01/90, 90-04-01) and six digits (900401 or 040190).
_TWO_DIGIT_YEAR_RE = re.compile(r"[0-9]{1,2}([-/. ])[0-9]{1,2}\1[0-9]{2}|[0-9]{6}")
# A year, or a year and a month, without a day: 1990, 1990-04, 04/1990.
_PARTIAL_DATE_RE = re.compile(r"[0-9]{4}(?:[-/.][0-9]{1,2})?|[0-9]{1,2}[-/.][0-9]{4}")
_HAS_LETTER_RE = re.compile(r"[A-Za-z]")
# Month-name forms (April 1, 1990; 1 Apr 1990; 01-APR-1990): the only characters allowed.
_MONTH_FORM_CHARS_RE = re.compile(r"[A-Za-z0-9\s,./-]+")
# Groups: digits, ordinal suffix (1st, 2nd, 3rd, 4th), word.
_MONTH_FORM_TOKEN_RE = re.compile(r"([0-9]+)(st|nd|rd|th)?|([A-Za-z]+)", re.IGNORECASE)
_MONTH_NAMES = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
_MONTHS: dict[str, int] = {
    **{name: number for number, name in enumerate(_MONTH_NAMES, start=1)},
    **{name[:3]: number for number, name in enumerate(_MONTH_NAMES, start=1)},
    "sept": 9,
}
# Weekday names (0 = Monday, as date.weekday()); a date that names one must fall on it.
_WEEKDAYS: dict[str, int] = {
    **{
        name: number
        for number, names in enumerate(
            (
                ("monday", "mon"),
                ("tuesday", "tue", "tues"),
                ("wednesday", "wed"),
                ("thursday", "thu", "thur", "thurs"),
                ("friday", "fri"),
                ("saturday", "sat"),
                ("sunday", "sun"),
            )
        )
        for name in names
    }
}
# Words that may stand between the parts: "3rd of May 2001", "the 3rd of May, 2001".
_DATE_FILLER_WORDS = frozenset({"of", "the"})


@dataclass(frozen=True, slots=True)
class ParsedDate:
    """A calendar date read from text.

    Attributes:
        value: the date.
        time_dropped: the text gave a time of day other than midnight (a date-time), which
            a FHIR ``date`` cannot keep: the caller says so (a warning, the Provenance).
    """

    value: dt.date
    time_dropped: bool = False


def parse_date(raw: str, *, date_order: DateOrder | None = None) -> ParsedDate:
    """Read a calendar date, accepting every written form that has exactly one reading.

    Accepted (surrounding whitespace ignored):

    * year first: ``1990-04-01``, ``1990-4-1``, ``1990/04/01``, ``1990.04.01``; ISO 8601
      basic ``19900401`` (8 digits are always read year first);
    * year last, ``a/b/YYYY`` with ``/``, ``-``, ``.`` or a space between the numbers:
      read month first and day first, a form with one real date (``25/09/2003`` can only
      be 25 September; ``05/05/2003`` reads the same both ways) is that date. A form that
      is a real date both ways (``01/02/2003``, ``10.09.2003``) is read in ``date_order``
      (``MDY`` or ``DMY``); without one, the US forms with ``/`` or ``-`` are read month
      first, and the others (``.`` as in Germany, a space) are refused;
    * English month names, full or abbreviated, in any order with the day and a 4-digit
      year: ``April 1, 1990``, ``1 Apr 1990``, ``1st Apr. 1990``, ``01-APR-1990``,
      ``3rd of May 2001``, ``Sunday, April 1, 1990`` (the weekday must be that date's);
    * a date-time: ISO 8601 (``2003-09-25T10:49:00Z``, ``2003-09-25 10:49``) or any form
      above followed by a local time (``9/25/2003 10:49``, ``9/25/2003 12:00:00 AM``). The
      date is kept as written and ``time_dropped`` says a time other than midnight was
      given. With a UTC offset and a time that is midnight in another real time zone
      (``1990-03-31T22:00:00Z`` is midnight of 1 April at +02:00), the text has two
      readings: the date written, or a local date converted to UTC (as JavaScript's
      ``toISOString`` does); it is refused. A time at midnight (``T00:00:00Z``, how
      date-only values are serialised) has one reading.

    Refused because they have two readings or more: two-digit years (``01/02/03``,
    ``Apr 1 90``: the century is not known, nor the order of the numbers), and the cases
    above. The messages name both readings by their pattern (month first ``MM/DD/YYYY`` or
    day first ``DD/MM/YYYY``), never by the value.

    Spec: ISO 8601; FHIR R4 ``date`` (https://hl7.org/fhir/R4/datatypes.html#date).

    Args:
        raw: the date as typed.
        date_order: the form's order for dates a year-last form leaves open (a profile's
            ``date_order``); ``YMD`` settles nothing for year-last forms.

    Returns:
        The :class:`ParsedDate`.

    Raises:
        MappingError: ``missing_date`` when empty or blank; ``incomplete_date`` without a day
            or year (``1990``, ``April 1990``, ``April 1``); ``ambiguous_date`` when it has
            two readings (above); ``invalid_date`` for impossible dates (``02/30/1990``,
            ``13/25/1990``), a weekday that is not the date's, and unparseable text.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_date", "A date is required.")
    return _parse_date(text, date_order)


def normalize_date(raw: str, *, date_order: DateOrder | None = None) -> str:
    """Normalise a calendar date answer (not a birth date) to a FHIR ``date``.

    Accepts what :func:`parse_date` accepts; a time of day is dropped (use
    :func:`parse_date` to know whether one was).

    Returns:
        ``YYYY-MM-DD``.

    Raises:
        MappingError: as :func:`parse_date`.
    """
    return parse_date(raw, date_order=date_order).value.isoformat()


def parse_birth_date(
    raw: str, *, today: dt.date | None = None, date_order: DateOrder | None = None
) -> ParsedDate:
    """Read a birth date (:func:`parse_date`) and check that it is plausible.

    Intake needs day precision, so the partial FHIR forms ``YYYY`` and ``YYYY-MM`` are
    refused.

    Spec: FHIR R4 ``date`` (https://hl7.org/fhir/R4/datatypes.html#date), used by
    ``Patient.birthDate`` (US Core must-support), which has no time.

    Args:
        raw: the birth date as typed.
        today: the reference date for the range checks; defaults to ``date.today()`` (the
            server's local date). A ``datetime`` is reduced to its date.
        date_order: as :func:`parse_date`.

    Returns:
        The :class:`ParsedDate` (``time_dropped`` when a time of birth was given).

    Raises:
        MappingError: ``missing_date``, ``incomplete_date``, ``ambiguous_date`` or
            ``invalid_date`` as :func:`parse_date`; ``birth_date_in_future`` when after
            ``today``; ``birth_date_too_old`` when more than 130 years before ``today``.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_date", "A birth date is required.")
    parsed = _parse_date(text, date_order)
    _check_birth_date_range(parsed.value, today)
    return parsed


def normalize_birth_date(
    raw: str, *, today: dt.date | None = None, date_order: DateOrder | None = None
) -> str:
    """Normalise a birth date to a FHIR ``date`` with day precision (:func:`parse_birth_date`).

    Returns:
        ``YYYY-MM-DD``.

    Raises:
        MappingError: as :func:`parse_birth_date`.
    """
    return parse_birth_date(raw, today=today, date_order=date_order).value.isoformat()


def _parse_date(text: str, order: DateOrder | None) -> ParsedDate:
    if ":" in text:  # a time of day: every date-time form has one
        match = _ISO_DATETIME_RE.fullmatch(text)
        if match is not None:
            return _date_from_iso_datetime(match)
        match = _TRAILING_TIME_RE.fullmatch(text)
        if match is not None:
            date_text, hour, minute, second, fraction, half = match.groups()
            at_midnight = _check_local_time(hour, minute, second, fraction, half)
            value = _parse_calendar_date(date_text.strip(), order)
            return ParsedDate(value, time_dropped=not at_midnight)
    return ParsedDate(_parse_calendar_date(text, order))


def _parse_calendar_date(text: str, order: DateOrder | None) -> dt.date:
    numeric = _SPACED_SEPARATOR_RE.sub(r"\1", text) if " " in text else text
    match = _YMD_RE.fullmatch(numeric)
    if match is not None:
        year, _, month, day = match.groups()
        return _make_date(int(year), int(month), int(day), "YYYY-MM-DD")
    match = _YEAR_LAST_RE.fullmatch(numeric)
    if match is not None:
        first, separator, second, year = match.groups()
        return _year_last_date(int(first), int(second), int(year), separator, order)
    match = _COMPACT_RE.fullmatch(numeric)
    if match is not None:
        year, month, day = match.groups()
        return _make_date(int(year), int(month), int(day), "YYYYMMDD, year first")
    if _TWO_DIGIT_YEAR_RE.fullmatch(numeric) is not None:
        raise MappingError(
            "ambiguous_date",
            "Expected a 4-digit year: with a 2-digit year the date has several readings "
            "(19xx or 20xx, and which number is the day, the month and the year). Send "
            "YYYY-MM-DD.",
        )
    if _PARTIAL_DATE_RE.fullmatch(numeric) is not None:
        raise _incomplete_date_error()
    if _HAS_LETTER_RE.search(text) is not None:
        return _parse_month_name_date(text)
    raise _unparseable_date_error()


def _year_last_date(
    first: int, second: int, year: int, separator: str, order: DateOrder | None
) -> dt.date:
    """``first/second/year``: the one reading, or the reading ``order`` (or the US default
    for ``/`` and ``-``) picks when month first and day first are both real dates."""
    month_first = _date_or_none(year, first, second)
    day_first = _date_or_none(year, second, first)
    s = separator
    if month_first is None:
        if day_first is None:
            raise MappingError(
                "invalid_date",
                f"Expected a real calendar date: neither month first (MM{s}DD{s}YYYY) nor "
                f"day first (DD{s}MM{s}YYYY) is a day that exists.",
            )
        return day_first
    if day_first is None or day_first == month_first:
        return month_first
    if order is None and separator in "/-":
        order = "MDY"  # the US forms
    if order == "MDY":
        return month_first
    if order == "DMY":
        return day_first
    raise MappingError(
        "ambiguous_date",
        f"Expected a date with one reading: this one is a real date both month first "
        f"(MM{s}DD{s}YYYY) and day first (DD{s}MM{s}YYYY). Send it as YYYY-MM-DD, or set "
        "date_order in the form's profile.",
    )


def _date_or_none(year: int, month: int, day: int) -> dt.date | None:
    if year < 1 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    return dt.date(year, month, day)


def _make_date(year: int, month: int, day: int, expected: str) -> dt.date:
    if not 1 <= month <= 12:
        raise MappingError(
            "invalid_date", f"Expected a real calendar date ({expected}); the month is not 1-12."
        )
    if year < 1 or not 1 <= day <= _days_in_month(year, month):
        raise MappingError(
            "invalid_date",
            f"Expected a real calendar date ({expected}); that day does not exist.",
        )
    return dt.date(year, month, day)


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _check_local_time(
    hour: str, minute: str, second: str | None, fraction: str | None, half: str | None
) -> bool:
    """Check a wall-clock time (24-hour, or 12-hour with AM/PM); True at midnight."""
    hour_i, minute_i, second_i = int(hour), int(minute), int(second or 0)
    if half is not None:
        valid_hour = 1 <= hour_i <= 12
        hour_i = hour_i % 12 + (12 if half.lower() == "p" else 0)
    else:
        valid_hour = hour_i <= 23
    if not valid_hour or minute_i > 59 or second_i > 59:
        raise MappingError(
            "invalid_date", "Expected a date; the time after it is not a valid time of day."
        )
    return hour_i == 0 and minute_i == 0 and second_i == 0 and not (fraction or "").strip("0")


def _date_from_iso_datetime(match: re.Match[str]) -> ParsedDate:
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    hour_i, minute_i, second_i = int(hour), int(minute), int(second or 0)
    if hour_i > 23 or minute_i > 59 or second_i > 59:
        raise MappingError(
            "invalid_date", "Expected a date (YYYY-MM-DD); the time part is not a valid time."
        )
    if sign is not None and (int(off_h) > _MAX_OFFSET_HOURS or int(off_m or 0) > 59):
        raise MappingError(
            "invalid_date", "Expected a date (YYYY-MM-DD); the UTC offset is not valid."
        )
    value = _make_date(int(year), int(month), int(day), "YYYY-MM-DD")
    at_midnight = (
        hour_i == 0 and minute_i == 0 and second_i == 0 and not (fraction or "").strip("0")
    )
    if at_midnight:
        return ParsedDate(value)
    if zulu is not None or sign is not None:
        offset_min = 0 if zulu is not None else int(off_h) * 60 + int(off_m or 0)
        if sign == "-":
            offset_min = -offset_min
        whole_minute = second_i == 0 and not (fraction or "").strip("0")
        if whole_minute and _midnight_of_another_day(hour_i * 60 + minute_i, offset_min):
            raise MappingError(
                "ambiguous_date",
                "Expected a date: this date-time is midnight in another time zone, so it may "
                "be a date converted to UTC (as JavaScript's toISOString does), which moves it "
                "to the day before or after. Send the date alone (YYYY-MM-DD).",
            )
    return ParsedDate(value, time_dropped=True)


def _midnight_of_another_day(minute_of_day: int, offset_min: int) -> bool:
    """True when the instant ``minute_of_day`` at UTC ``offset_min`` is local midnight, on
    another calendar day, at some real UTC offset (-12:00 to +14:00)."""
    for other in _REAL_OFFSETS_MIN:
        local = minute_of_day - offset_min + other
        if local != 0 and local % _MINUTES_PER_DAY == 0:
            return True
    return False


def _parse_month_name_date(text: str) -> dt.date:
    if _MONTH_FORM_CHARS_RE.fullmatch(text) is None:
        raise _unparseable_date_error()
    month = 0
    weekday: int | None = None
    numbers: list[str] = []
    for digits, ordinal, word in _MONTH_FORM_TOKEN_RE.findall(text):
        if digits:
            if ordinal and len(digits) > 2:
                raise _unparseable_date_error()
            numbers.append(digits)
            continue
        lowered = word.lower()
        if lowered in _DATE_FILLER_WORDS:
            continue
        if lowered in _WEEKDAYS and weekday is None:
            weekday = _WEEKDAYS[lowered]
            continue
        month_number = _MONTHS.get(lowered)
        if month_number is None or month:
            # Another word (a place) or a second month: not a date we can trust.
            raise _unparseable_date_error()
        month = month_number
    if not month:
        raise _unparseable_date_error()
    if len(numbers) < 2:
        raise _incomplete_date_error()
    if len(numbers) > 2:
        raise _unparseable_date_error()
    years = [n for n in numbers if len(n) == 4]
    days = [n for n in numbers if len(n) <= 2]
    if len(years) == 1 and len(days) == 1:
        value = _make_date(int(years[0]), month, int(days[0]), "Month D, YYYY")
        if weekday is not None and value.weekday() != weekday:
            raise MappingError(
                "invalid_date",
                "Expected a date whose day of the week is the one given; they do not match, "
                "so which is right is not known.",
            )
        return value
    if len(days) == 2:
        raise MappingError(
            "ambiguous_date",
            "Expected a 4-digit year: with a 2-digit year the century (19xx or 20xx) is not known.",
        )
    raise _unparseable_date_error()


def _check_birth_date_range(value: dt.date, today: dt.date | None) -> dt.date:
    if today is None:
        today = dt.date.today()
    elif isinstance(today, dt.datetime):
        today = today.date()
    if value > today:
        raise MappingError(
            "birth_date_in_future", "Expected a birth date that is not in the future."
        )
    oldest = _years_before(today, _BIRTH_DATE_MAX_AGE_YEARS)
    if value < oldest:
        raise MappingError(
            "birth_date_too_old",
            f"Expected a birth date within the last {_BIRTH_DATE_MAX_AGE_YEARS} years.",
        )
    return value


def _years_before(day: dt.date, years: int) -> dt.date:
    # 29 February has no anniversary in a common year; 28 February stands in for it.
    year = day.year - years
    if day.month == 2 and day.day == 29 and _days_in_month(year, 2) == 28:
        return dt.date(year, 2, 28)
    return day.replace(year=year)


def _incomplete_date_error() -> MappingError:
    return MappingError(
        "incomplete_date",
        "Expected a full date with day, month and year (YYYY-MM-DD).",
    )


def _unparseable_date_error() -> MappingError:
    return MappingError(
        "invalid_date",
        "Expected a date as YYYY-MM-DD, MM/DD/YYYY, or an English month name with the day "
        "and a 4-digit year.",
    )


# --------------------------------------------------------------------------------------------
# Email
# --------------------------------------------------------------------------------------------

# One "@", a non-empty local part, a domain of at least two non-empty dot-separated labels,
# and no whitespace or control characters anywhere. Deliberately not RFC 5322: quoted local
# parts and IP-literal domains do not occur in patient intake.
_EMAIL_RE = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f.]+(?:\.[^@\s\x00-\x1f\x7f.]+)+")
_EMAIL_MAX_LENGTH = 254  # RFC 5321 section 4.5.3.1.3 (path limit, less the angle brackets)


def normalize_email(raw: str) -> str:
    """Normalise an email address: trim and lower-case it, internationalized domain in one form.

    Lower-casing the local part is a deliberate simplification: providers treat it as
    case-insensitive in practice, and EHR patient matching compares addresses exactly.
    An internationalized domain arrives as typed (``bücher.de``) or in its ASCII form
    (``xn--bcher-kva.de``) depending on the form library; both become the Unicode form
    (IDNA 2008 with UTS #46 mapping, RFC 5891 / https://unicode.org/reports/tr46/), so the
    same patient's intake and checkout carry the same address. A domain that is not valid
    IDNA (an emoji domain registered under IDNA 2003, say) is kept as typed, lower-cased.

    Spec: the shape follows RFC 5321 (``local@domain``, at most 254 characters); FHIR
    ``ContactPoint`` with ``system = email``.

    Args:
        raw: the address as typed.

    Returns:
        The trimmed, lower-cased address, e.g. ``jane.doe@example.com``.

    Raises:
        MappingError: ``missing_email`` when empty or blank; ``invalid_email`` unless it has
            exactly one ``@``, a non-empty local part, a domain with a dot and no empty
            labels, no whitespace inside, and at most 254 characters.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_email", "An email address is required.")
    if len(text) > _EMAIL_MAX_LENGTH or _EMAIL_RE.fullmatch(text) is None:
        raise MappingError(
            "invalid_email",
            "Expected an email address: one '@' between a local part and a domain with a "
            "dot, no spaces, at most 254 characters.",
        )
    local, _, domain = text.rpartition("@")
    if not domain.isascii() or "xn--" in domain.lower():
        try:
            return f"{local.lower()}@{idna.decode(domain, uts46=True)}"
        except idna.IDNAError:
            pass
    return text.lower()


# --------------------------------------------------------------------------------------------
# Name
# --------------------------------------------------------------------------------------------

# C0 and C1 control characters except tab, line feed and carriage return, which are
# whitespace and collapse to a space. Vertical tab, form feed and the information separators
# (\x1c-\x1f, which str.split() would silently treat as whitespace) are refused.
_NAME_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LETTER_RE = re.compile(r"[^\W\d_]")


def normalize_name(raw: str) -> str:
    """Normalise a personal name part (given, family, middle) without changing its case.

    Trims, collapses each run of whitespace to one space, deletes invisible format
    characters (zero-width space, BOM, bidirectional marks; zero-width joiners only at the
    ends, as they join emoji and Indic or Persian letters), and applies Unicode NFC so that
    composed and decomposed accents compare equal. Case is kept as typed: ``McDonald``,
    ``de la Cruz`` and ``O'Brien`` have no rule-based capitalisation.

    Spec: FHIR ``HumanName.family`` / ``HumanName.given``; Unicode UAX #15 (NFC).

    Args:
        raw: the name as typed.

    Returns:
        The cleaned name, e.g. ``Mary Ann``.

    Raises:
        MappingError: ``missing_name`` when empty or blank; ``invalid_name`` when it contains
            control characters, or no letter at all (digits or punctuation only).
    """
    if _NAME_CONTROL_RE.search(raw) is not None:
        raise MappingError("invalid_name", "Expected a name without control characters.")
    text = _visible(" ".join(raw.translate(_INVISIBLE).split()))
    if not text:
        raise MappingError("missing_name", "A name is required.")
    if _LETTER_RE.search(text) is None:
        raise MappingError("invalid_name", "Expected a name containing letters.")
    return unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------------------------
# Date-times
# --------------------------------------------------------------------------------------------

_ONE_MINUTE = dt.timedelta(minutes=1)


def parse_datetime(raw: str) -> dt.datetime:
    """Parse an ISO 8601 / RFC 3339 date-time that carries a UTC offset.

    Accepts ``YYYY-MM-DDThh:mm[:ss[.fraction]]`` followed by ``Z`` or ``+hh:mm`` / ``-hh:mm``
    (``+hhmm`` and ``+hh`` too), with ``T`` or a space between date and time. Fractions
    beyond microseconds are truncated. ``-00:00`` is read as UTC.

    Spec: ISO 8601 / RFC 3339; FHIR ``dateTime`` and ``instant`` require an offset whenever a
    time is present (https://hl7.org/fhir/R4/datatypes.html#dateTime).

    Args:
        raw: the timestamp as received.

    Returns:
        A timezone-aware ``datetime`` with a fixed-offset ``tzinfo`` equal to the one given.

    Raises:
        MappingError: ``missing_datetime`` when empty or blank; ``missing_timezone`` when the
            time has no offset (a naive local time cannot be placed on the timeline);
            ``invalid_datetime`` for anything else, including date-only values and
            impossible dates or times.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_datetime", "A date and time are required.")
    match = _ISO_DATETIME_RE.fullmatch(text)
    if match is None:
        raise _invalid_datetime_error()
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu is None and sign is None:
        raise MappingError(
            "missing_timezone",
            "Expected a date-time with a UTC offset, such as 'Z' or '+02:00'.",
        )
    month_i, day_i = int(month), int(day)
    hour_i, minute_i, second_i = int(hour), int(minute), int(second or 0)
    offset_h, offset_m = int(off_h or 0), int(off_m or 0)
    if (
        not 1 <= month_i <= 12
        or not 1 <= day_i <= _days_in_month(int(year), month_i)
        or int(year) < 1
        or hour_i > 23
        or minute_i > 59
        or second_i > 59
        or offset_h > _MAX_OFFSET_HOURS
        or offset_m > 59
    ):
        raise _invalid_datetime_error()
    if zulu is not None:
        tz = dt.UTC
    else:
        offset = dt.timedelta(hours=offset_h, minutes=offset_m)
        tz = dt.timezone(-offset if sign == "-" else offset)
    microsecond = int(fraction[:6].ljust(6, "0")) if fraction else 0
    return dt.datetime(
        int(year), month_i, day_i, hour_i, minute_i, second_i, microsecond, tzinfo=tz
    )


def to_fhir_instant(value: dt.datetime) -> str:
    """Format an aware ``datetime`` for FHIR ``instant`` / ``dateTime``, keeping its offset.

    Seconds are always present; milliseconds only when non-zero (microseconds beyond them
    are truncated, as FHIR servers commonly store milliseconds). A zero offset is written
    ``Z``; any other offset as ``+hh:mm`` / ``-hh:mm``, so the local time stays as given.

    Spec: FHIR R4 ``instant`` (https://hl7.org/fhir/R4/datatypes.html#instant): a time zone
    is required.

    Args:
        value: a timezone-aware datetime.

    Returns:
        e.g. ``2024-05-01T12:00:00+02:00``, ``2024-05-01T10:00:00.123Z``.

    Raises:
        MappingError: ``missing_timezone`` when ``value`` is naive; ``invalid_datetime`` when
            its offset is not a whole number of minutes, which FHIR cannot express.
    """
    offset = value.utcoffset()
    if offset is None:
        raise MappingError(
            "missing_timezone", "Expected a timezone-aware date-time; FHIR requires an offset."
        )
    if offset % _ONE_MINUTE:
        raise MappingError("invalid_datetime", "Expected a UTC offset in whole minutes (+hh:mm).")
    base = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    millisecond = value.microsecond // 1000
    if millisecond:
        base = f"{base}.{millisecond:03d}"
    total_seconds = int(offset.total_seconds())
    if total_seconds == 0:
        return f"{base}Z"
    sign = "-" if total_seconds < 0 else "+"
    hours, minutes = divmod(abs(total_seconds) // 60, 60)
    return f"{base}{sign}{hours:02d}:{minutes:02d}"


def _invalid_datetime_error() -> MappingError:
    return MappingError(
        "invalid_datetime",
        "Expected an ISO 8601 date-time with a UTC offset: YYYY-MM-DDThh:mm:ss followed by "
        "Z or +hh:mm.",
    )
