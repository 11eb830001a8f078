"""Normalise messy intake values (phones, states, ZIPs, dates, emails, names, timestamps).

Every function takes the raw string a patient or partner typed and returns the one canonical
form the FHIR mappers emit, or raises :class:`mappers.errors.MappingError` with a stable
``code``. Messages say what was expected and never repeat the input, which is PHI. Callers
add the location (``ProblemCollector.run("patient.phone", normalize_phone, raw)``).

Codes raised, by function::

    normalize_phone          missing_phone, invalid_phone, phone_has_extension
    normalize_state          missing_state, invalid_state
    normalize_postal_code    missing_postal_code, invalid_postal_code
    normalize_birth_date     missing_date, incomplete_date, ambiguous_date, invalid_date,
                             birth_date_in_future, birth_date_too_old
    normalize_date           missing_date, incomplete_date, ambiguous_date, invalid_date
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

import idna
import phonenumbers
from us import states as us_states

from mappers.errors import MappingError

__all__ = [
    "normalize_birth_date",
    "normalize_date",
    "normalize_email",
    "normalize_name",
    "normalize_phone",
    "normalize_postal_code",
    "normalize_state",
    "parse_datetime",
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

# RFC 3966 URI prefix, which phonenumbers also understands; we strip it so the character check
# below sees only the number.
_TEL_PREFIX_RE = re.compile(r"\s*tel:", re.IGNORECASE)
# An extension at the end: "x123", "ext. 5", "extension 22", "#5", ";ext=5". phonenumbers
# parses these into PhoneNumber.extension, which E.164 cannot carry.
_PHONE_EXTENSION_RE = re.compile(
    r"(?:;\s*ext\s*=|#|x|ext\.?|extn\.?|extension)\s*[0-9]+\s*$", re.IGNORECASE
)
# What a phone number may be written with. Letters are refused on purpose: phonenumbers drops
# leading words ("call 415...") and turns trailing ones into keypad digits ("... home" ->
# "4663", "1-800-FLOWERS"), so free text would silently become a different number. Non-ASCII
# digits (Arabic-Indic, full-width) are let through: phonenumbers maps them to ASCII.
_PHONE_CHARS_RE = re.compile(r"\+?[\d\s().\-/\[\]\u2010-\u2015\u2212\ufe63\uff0d]+")


def normalize_phone(raw: str, *, default_region: str = "US") -> str:
    """Normalise a telephone number to E.164.

    Accepts national US forms (``(415) 555-2671``, ``415.555.2671``, ``1-415-555-2671``),
    international forms with ``+`` (``+44 20 7946 0958``), the international dialling prefix
    of ``default_region`` (``011 44 ...`` for the US), an RFC 3966 ``tel:`` prefix, surrounding
    whitespace and Unicode dashes. The number must be *valid* for its region according to
    libphonenumber metadata, not only of a possible length: ``555-1234`` would otherwise
    format as ``+15551234``.

    Spec: ITU-T E.164. FHIR only recommends a leading ``+`` in ``ContactPoint.value`` for
    ``system = phone``; E.164 is the gateway's choice so that EHR-side matching is exact.

    Args:
        raw: the number as typed.
        default_region: ISO 3166-1 alpha-2 region used when ``raw`` has no ``+``.

    Returns:
        ``+`` followed by the country code and national number, e.g. ``+14155552671``.

    Raises:
        MappingError: ``missing_phone`` when empty or blank; ``phone_has_extension`` when an
            extension (``x123``, ``ext. 5``, ``#5``) is present, because E.164 cannot carry it
            and dropping it silently would lose a digit string the caller meant to keep;
            ``invalid_phone`` when it contains letters or other text, cannot be parsed, or is
            not a valid number.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_phone", "A phone number is required.")
    prefix = _TEL_PREFIX_RE.match(text)
    if prefix is not None:
        text = text[prefix.end() :]
    if _PHONE_EXTENSION_RE.search(text) is not None:
        raise _phone_extension_error()
    if _PHONE_CHARS_RE.fullmatch(text) is None:
        raise MappingError(
            "invalid_phone",
            "Expected a phone number made of digits, with an optional leading '+', spaces, "
            "dashes, dots or parentheses.",
        )
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise _invalid_phone_error() from exc
    if number.extension:
        raise _phone_extension_error()
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
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _invalid_phone_error() -> MappingError:
    return MappingError(
        "invalid_phone",
        "Expected a valid phone number: 10 digits for a US number, or '+' and the country "
        "code for an international one.",
    )


def _phone_extension_error() -> MappingError:
    return MappingError(
        "phone_has_extension",
        "Expected a phone number without an extension; E.164 cannot carry one.",
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


def _state_key(text: str) -> str:
    return _STATE_IGNORED_RE.sub("", text).casefold()


def _build_state_table() -> dict[str, str]:
    """Map every accepted spelling (as :func:`_state_key`) to its USPS code.

    Exact keys only: `us.states.lookup` matches names by metaphone, so it turns ``Texs`` into
    Texas, which is a guess we must not make with a patient's address.
    """
    table: dict[str, str] = {}

    def add(code: str, spellings: Iterable[str]) -> None:
        for spelling in spellings:
            key = _state_key(spelling)
            if table.setdefault(key, code) != code:
                raise RuntimeError(f"state spelling {spelling!r} maps to two USPS codes")

    # DC and the freely associated states are listed explicitly: whether DC is in
    # STATES_AND_TERRITORIES has depended on the `us` version and on the DC_STATEHOOD
    # environment variable, and FM, MH and PW are in USPS Publication 28 but only in
    # ASSOCIATED_STATES.
    places = [*us_states.STATES_AND_TERRITORIES, us_states.DC, *us_states.ASSOCIATED_STATES]
    for place in places:
        if place.is_obsolete:
            continue
        spellings = [place.abbr, place.name]
        if place.ap_abbr:
            spellings.append(place.ap_abbr)
        add(place.abbr, spellings)
    for code, names in _MILITARY_STATES.items():
        add(code, (code, *names))
    for code, names in _STATE_ALIASES.items():
        add(code, names)
    return table


_STATE_CODES: dict[str, str] = _build_state_table()


def normalize_state(raw: str) -> str:
    """Normalise a US state, district, territory or military code to its USPS code.

    Accepts, in any case and with extra spaces, periods or commas: two-letter codes (``tx``,
    ``N.Y.``, ``D.C.``), full names (``New  York``, ``district of columbia``,
    ``Washington DC``, ``Puerto Rico``), AP style abbreviations (``Calif.``), the territories
    (AS, GU, MP, PR, VI), the freely associated states (FM, MH, PW) and the military codes
    AA, AE and AP. Matching is exact: misspellings are rejected, never guessed.

    Spec: USPS Publication 28, Appendix B; US Core binds ``Patient.address.state`` to the
    USPS code system (``us-core-usps-state``, extensible).

    Args:
        raw: the state as typed.

    Returns:
        The two-letter USPS code in upper case, e.g. ``TX``.

    Raises:
        MappingError: ``missing_state`` when empty or blank; ``invalid_state`` when it is not
            a known USPS code or name (``Texs``, ``XX``, ``Ontario``).
    """
    key = _state_key(_visible(raw))
    if not key:
        raise MappingError("missing_state", "A US state is required.")
    code = _STATE_CODES.get(key)
    if code is None:
        raise MappingError(
            "invalid_state",
            "Expected a USPS two-letter code or the full name of a US state, territory or "
            "military region.",
        )
    return code


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
# Birth date
# --------------------------------------------------------------------------------------------

_BIRTH_DATE_MAX_AGE_YEARS = 130

# Year first: 1990-04-01, 1990/04/01, 1990.4.1 (one separator throughout).
_YMD_RE = re.compile(r"([0-9]{4})([-/.])([0-9]{1,2})\2([0-9]{1,2})")
# Month first (US order): 04/01/1990, 4-1-1990, 04.01.1990.
_MDY_RE = re.compile(r"([0-9]{1,2})([-/.])([0-9]{1,2})\2([0-9]{4})")
# ISO 8601 basic: 19900401.
_COMPACT_RE = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})")
# ISO 8601 / RFC 3339 date-time: groups are year, month, day, hour, minute, second, fraction,
# "Z", offset sign, offset hours, offset minutes. Shared with parse_datetime.
_ISO_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
_MAX_OFFSET_HOURS = 14  # UTC+14 (Line Islands) and UTC-12 are the real extremes
# Two-digit years (04/01/90, 90-04-01) and six digits (900401 or 040190).
_TWO_DIGIT_YEAR_RE = re.compile(r"[0-9]{1,2}([-/.])[0-9]{1,2}\1[0-9]{2}|[0-9]{6}")
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


def normalize_birth_date(raw: str, *, today: dt.date | None = None) -> str:
    """Normalise a birth date to a FHIR ``date`` with day precision.

    Accepted forms (surrounding whitespace ignored):

    * year first: ``1990-04-01``, ``1990-4-1``, ``1990/04/01``, ``1990.04.01``;
    * ISO 8601 basic: ``19900401``;
    * numeric forms that do not start with a 4-digit year are read in US order, month first:
      ``04/01/1990``, ``4/1/1990``, ``04-01-1990``, ``04.01.1990`` are all 1 April 1990;
    * English month names, full or abbreviated, in any order with a 4-digit year:
      ``April 1, 1990``, ``Apr 1 1990``, ``1 April 1990``, ``1st Apr. 1990``, ``01-APR-1990``;
    * ISO 8601 date-times, whose date part is used as written when no time zone conversion
      can have moved it: without an offset (``1990-04-01T00:00:00``), or at exactly midnight
      with any offset (``1990-04-01T00:00:00Z``, how date-only values are serialised). A
      non-midnight time with an offset (``1990-03-31T22:00:00Z``) is typically local midnight
      converted to UTC, so the calendar date cannot be known.

    Intake needs day precision, so the partial FHIR forms ``YYYY`` and ``YYYY-MM`` are refused.

    Spec: FHIR R4 ``date`` (https://hl7.org/fhir/R4/datatypes.html#date), used by
    ``Patient.birthDate`` (US Core must-support).

    Args:
        raw: the birth date as typed.
        today: the reference date for the range checks; defaults to ``date.today()`` (the
            server's local date). A ``datetime`` is reduced to its date.

    Returns:
        ``YYYY-MM-DD``.

    Raises:
        MappingError: ``missing_date`` when empty or blank; ``incomplete_date`` without a day
            or year (``1990``, ``April 1990``, ``April 1``); ``ambiguous_date`` for two-digit
            years (``04/01/90``) and other forms whose order cannot be known;
            ``invalid_date`` for impossible dates (``02/30/1990``, ``13/25/1990``: a
            day-first date where month first is expected) and unparseable text;
            ``birth_date_in_future`` when after ``today``; ``birth_date_too_old`` when more
            than 130 years before ``today``.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_date", "A birth date is required.")
    value = _parse_date(text)
    return _check_birth_date_range(value, today).isoformat()


def normalize_date(raw: str) -> str:
    """Normalise a calendar date answer (not a birth date) to a FHIR ``date``.

    Accepts the same forms as :func:`normalize_birth_date` (ISO, US month-first, month
    names, ``YYYYMMDD``) without the birth-date range checks.

    Returns:
        ``YYYY-MM-DD``.

    Raises:
        MappingError: ``missing_date``, ``incomplete_date``, ``ambiguous_date`` or
            ``invalid_date``, as for :func:`normalize_birth_date`.
    """
    text = _visible(raw)
    if not text:
        raise MappingError("missing_date", "A date is required.")
    return _parse_date(text).isoformat()


def _parse_date(text: str) -> dt.date:
    match = _YMD_RE.fullmatch(text)
    if match is not None:
        year, _, month, day = match.groups()
        return _make_date(int(year), int(month), int(day), "YYYY-MM-DD")
    match = _MDY_RE.fullmatch(text)
    if match is not None:
        month, _, day, year = match.groups()
        return _make_date(int(year), int(month), int(day), "MM/DD/YYYY")
    match = _COMPACT_RE.fullmatch(text)
    if match is not None:
        year, month, day = match.groups()
        return _make_date(int(year), int(month), int(day), "YYYYMMDD")
    match = _ISO_DATETIME_RE.fullmatch(text)
    if match is not None:
        return _date_from_datetime(match)
    if _TWO_DIGIT_YEAR_RE.fullmatch(text) is not None:
        raise MappingError(
            "ambiguous_date",
            "Expected a 4-digit year; a 2-digit year does not say the century. "
            "Use YYYY-MM-DD or MM/DD/YYYY.",
        )
    if _PARTIAL_DATE_RE.fullmatch(text) is not None:
        raise _incomplete_date_error()
    if _HAS_LETTER_RE.search(text) is not None:
        return _parse_month_name_date(text)
    raise _unparseable_date_error()


def _make_date(year: int, month: int, day: int, expected: str) -> dt.date:
    if not 1 <= month <= 12:
        if expected == "MM/DD/YYYY":
            message = (
                "Expected the month first (MM/DD/YYYY); the first number is not a month "
                "(1-12). Day-first dates are not accepted."
            )
        else:
            message = f"Expected a real calendar date ({expected}); the month is not 1-12."
        raise MappingError("invalid_date", message)
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


def _date_from_datetime(match: re.Match[str]) -> dt.date:
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
    has_offset = zulu is not None or sign is not None
    at_midnight = (
        hour_i == 0 and minute_i == 0 and second_i == 0 and not (fraction or "").strip("0")
    )
    if has_offset and not at_midnight:
        raise MappingError(
            "ambiguous_date",
            "Expected a date (YYYY-MM-DD); a date-time with a UTC offset and a time other "
            "than midnight may have been shifted by a time zone conversion.",
        )
    return _make_date(int(year), int(month), int(day), "YYYY-MM-DD")


def _parse_month_name_date(text: str) -> dt.date:
    if _MONTH_FORM_CHARS_RE.fullmatch(text) is None:
        raise _unparseable_date_error()
    month = 0
    numbers: list[str] = []
    for digits, ordinal, word in _MONTH_FORM_TOKEN_RE.findall(text):
        if digits:
            if ordinal and len(digits) > 2:
                raise _unparseable_date_error()
            numbers.append(digits)
            continue
        month_number = _MONTHS.get(word.lower())
        if month_number is None or month:
            # Another word (a weekday, a place) or a second month: not a date we can trust.
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
        return _make_date(int(years[0]), month, int(days[0]), "Month D, YYYY")
    if len(days) == 2:
        raise MappingError(
            "ambiguous_date",
            "Expected a 4-digit year; a 2-digit year does not say the century.",
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
        "Expected a full birth date with day, month and year (YYYY-MM-DD).",
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
