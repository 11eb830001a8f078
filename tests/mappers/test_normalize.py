"""Tests for mappers.normalize: messy valid inputs, and rejected inputs by error code.

Every rejected case also checks that the error message does not repeat the input (PHI).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import pytest
from us import states as us_states

from mappers.errors import MappingError
from mappers.normalize import (
    PhoneNumber,
    normalize_birth_date,
    normalize_date,
    normalize_email,
    normalize_name,
    normalize_phone,
    normalize_postal_code,
    normalize_state,
    parse_birth_date,
    parse_date,
    parse_datetime,
    parse_phone,
    to_fhir_instant,
)

TODAY = dt.date(2024, 6, 15)
UTC = dt.UTC
PLUS_2 = dt.timezone(dt.timedelta(hours=2))
MINUS_5 = dt.timezone(dt.timedelta(hours=-5))
PLUS_530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
MINUS_330 = dt.timezone(-dt.timedelta(hours=3, minutes=30))

# FHIR R4 instant regex, from https://hl7.org/fhir/R4/datatypes.html#instant
FHIR_INSTANT_RE = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
# FHIR R4 date regex, from https://hl7.org/fhir/R4/datatypes.html#date (day precision only)
FHIR_FULL_DATE_RE = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
)


def assert_rejected(func: Callable[..., Any], raw: str, code: str, **kwargs: Any) -> MappingError:
    """Call ``func(raw)``, expect a MappingError with ``code`` whose message hides ``raw``."""
    with pytest.raises(MappingError) as info:
        func(raw, **kwargs)
    error = info.value
    assert error.code == code
    assert error.problem.code == code
    assert str(error) == error.problem.message
    assert error.problem.message
    stripped = raw.strip()
    if len(stripped) > 3:
        assert stripped.casefold() not in str(error).casefold()
    return error


# --------------------------------------------------------------------------------------------
# normalize_phone
# --------------------------------------------------------------------------------------------

VALID_PHONES = [
    pytest.param("(415) 555-2671", "US", "+14155552671", id="us-parentheses"),
    pytest.param("415.555.2671", "US", "+14155552671", id="us-dots"),
    pytest.param("415 555 2671", "US", "+14155552671", id="us-spaces"),
    pytest.param("4155552671", "US", "+14155552671", id="us-digits-only"),
    pytest.param("1-415-555-2671", "US", "+14155552671", id="us-trunk-prefix"),
    pytest.param("+1 415 555 2671", "US", "+14155552671", id="us-plus-country-code"),
    pytest.param("+1 (415) 555-2671", "US", "+14155552671", id="us-plus-and-parentheses"),
    pytest.param("+14155552671", "US", "+14155552671", id="already-e164"),
    pytest.param("tel:+1-415-555-2671", "US", "+14155552671", id="rfc3966-tel-uri"),
    pytest.param("TEL:+1-415-555-2671", "US", "+14155552671", id="tel-uri-upper-case"),
    pytest.param("  415-555-2671 \n", "US", "+14155552671", id="surrounding-whitespace"),
    pytest.param("415\u2013555\u20142671", "US", "+14155552671", id="unicode-dashes"),
    pytest.param("415\u00a0555\u00a02671", "US", "+14155552671", id="no-break-spaces"),
    pytest.param("415/555/2671", "US", "+14155552671", id="slashes"),
    pytest.param("201-555-0123", "US", "+12015550123", id="us-555-01xx-fictional-range"),
    pytest.param("+44 20 7946 0958", "US", "+442079460958", id="uk-with-plus"),
    pytest.param("011 44 20 7946 0958", "US", "+442079460958", id="uk-via-us-exit-code"),
    pytest.param("020 7946 0958", "GB", "+442079460958", id="uk-national-gb-region"),
    pytest.param(
        "\u0664\u0661\u0665\u0665\u0665\u0665\u0662\u0666\u0667\u0661",
        "US",
        "+14155552671",
        id="arabic-indic-digits",
    ),
    # Extensions, in the forms libphonenumber parses (its PhoneNumberUtil tests) and
    # RFC 3966's ext parameter: kept apart from the E.164 number.
    pytest.param("415-555-2671 x123", "US", "+14155552671;ext=123", id="ext-x"),
    pytest.param("415-555-2671x123", "US", "+14155552671;ext=123", id="ext-x-no-space"),
    pytest.param("(415) 555-2671 ext. 5", "US", "+14155552671;ext=5", id="ext-dot"),
    pytest.param("(415) 555-2671 EXT 5", "US", "+14155552671;ext=5", id="ext-upper-case"),
    pytest.param("+1 415 555 2671 extension 22", "US", "+14155552671;ext=22", id="ext-word"),
    pytest.param("415-555-2671 extn. 22", "US", "+14155552671;ext=22", id="ext-extn"),
    pytest.param("415-555-2671#5", "US", "+14155552671;ext=5", id="ext-hash"),
    pytest.param("4155552671,12", "US", "+14155552671;ext=12", id="ext-dialler-pause"),
    pytest.param("415-555-2671 x0012", "US", "+14155552671;ext=0012", id="ext-leading-zeros"),
    pytest.param("+44 20 7946 0958 x 3", "US", "+442079460958;ext=3", id="ext-uk"),
    # RFC 3966 tel URIs (section 3 examples: global, and local with a phone-context).
    pytest.param("tel:+1-415-555-2671;ext=12", "US", "+14155552671;ext=12", id="tel-uri-ext"),
    pytest.param(
        "tel:555-2671;phone-context=+1-415", "US", "+14155552671", id="tel-uri-phone-context"
    ),
    # Vanity numbers: letters are keypad digits (ITU-T E.161).
    pytest.param("1-800-FLOWERS", "US", "+18003569377", id="vanity-1-800-flowers"),
    pytest.param("1-800-flowers", "US", "+18003569377", id="vanity-lower-case"),
    pytest.param("1 (800) GOT-JUNK", "US", "+18004685865", id="vanity-got-junk"),
    pytest.param("415-555-HOME", "US", "+14155554663", id="vanity-last-four"),
    pytest.param("tel:+1-800-FLOWERS", "US", "+18003569377", id="vanity-tel-uri"),
    pytest.param("1-800-FLOWERS x12", "US", "+18003569377;ext=12", id="vanity-with-ext"),
    # A label before the number is skipped (libphonenumber's extraction).
    pytest.param("call 415 555 2671", "US", "+14155552671", id="leading-label"),
    pytest.param("cell: (415) 555-2671", "US", "+14155552671", id="leading-label-colon"),
]


@pytest.mark.parametrize(("raw", "region", "expected"), VALID_PHONES)
def test_normalize_phone_accepts(raw: str, region: str, expected: str) -> None:
    assert normalize_phone(raw, default_region=region) == expected


def test_parse_phone_keeps_the_extension_apart_and_round_trips() -> None:
    parsed = parse_phone("(415) 555-2671 ext. 12")
    assert parsed == PhoneNumber("+14155552671", "12")
    assert PhoneNumber.from_text(parsed.text) == parsed
    assert parse_phone("415-555-2671") == PhoneNumber("+14155552671", None)


INVALID_PHONES = [
    pytest.param("", "missing_phone", id="empty"),
    pytest.param("   \t", "missing_phone", id="blank"),
    pytest.param("555-1234", "invalid_phone", id="seven-digits-possible-but-not-valid"),
    pytest.param("415-555-267", "invalid_phone", id="nine-digits"),
    pytest.param("415-555-26710", "invalid_phone", id="eleven-digits"),
    pytest.param("123-456-7890", "invalid_phone", id="area-code-123"),
    pytest.param("000-000-0000", "invalid_phone", id="all-zeros"),
    pytest.param("+999 123 456 789", "invalid_phone", id="unknown-country-code"),
    pytest.param("00 44 20 7946 0958", "invalid_phone", id="non-us-exit-code"),
    pytest.param("415 555 2671 home", "invalid_phone", id="trailing-word"),
    pytest.param("415-555-2671 h", "invalid_phone", id="trailing-letter"),
    pytest.param("415-555-2671 (cell)", "invalid_phone", id="trailing-word-in-parentheses"),
    # A 7-digit local number and a word: libphonenumber would read "cel" as keypad digits
    # and make a valid, different number (+12122671235) of it.
    pytest.param("212-2671 cel", "invalid_phone", id="local-number-and-word"),
    pytest.param("+1-800-MATTRESS", "invalid_phone", id="vanity-one-letter-too-many"),
    pytest.param("415-555-2671 ext. 12 ask for Jo", "invalid_phone", id="words-after-ext"),
    pytest.param("415-555-2671 / 415-555-0000", "invalid_phone", id="two-numbers"),
    pytest.param("415_555_2671", "invalid_phone", id="underscores"),
    pytest.param("not a number", "invalid_phone", id="text"),
    pytest.param("tel:", "invalid_phone", id="tel-prefix-only"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_PHONES)
def test_normalize_phone_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_phone, raw, code)


def test_normalize_phone_rejects_unknown_default_region_for_national_number() -> None:
    assert_rejected(normalize_phone, "415 555 2671", "invalid_phone", default_region="ZZ")


UNASSIGNED_TEN_DIGIT_PHONES = [
    pytest.param("(555) 123-4567", id="area-code-555"),
    pytest.param("555.123.4567", id="area-code-555-dots"),
    pytest.param("+1 555 123 4567", id="area-code-555-plus-one"),
    pytest.param("1-555-123-4567", id="area-code-555-trunk-prefix"),
    pytest.param("(415) 155-2671", id="exchange-starting-with-1"),
]


@pytest.mark.parametrize("raw", UNASSIGNED_TEN_DIGIT_PHONES)
def test_a_ten_digit_number_nobody_can_have_says_so(raw: str) -> None:
    """Not "expected 10 digits" to someone who typed 10: the area code or exchange is the
    problem. (The fictional 555-01XX range with a real area code is accepted, see above.)"""
    error = assert_rejected(normalize_phone, raw, "invalid_phone")
    assert "not assigned" in str(error)
    assert "10 digits" not in str(error)


def test_seven_digits_are_still_asked_for_the_area_code() -> None:
    error = assert_rejected(normalize_phone, "555-1234", "invalid_phone")
    assert "10 digits" in str(error)


# --------------------------------------------------------------------------------------------
# normalize_state
# --------------------------------------------------------------------------------------------

VALID_STATES = [
    pytest.param("tx", "TX", id="code-lower"),
    pytest.param("Tx", "TX", id="code-mixed"),
    pytest.param("TX", "TX", id="code-upper"),
    pytest.param(" TEXAS ", "TX", id="name-upper-padded"),
    pytest.param("new york", "NY", id="name-lower"),
    pytest.param("New  York", "NY", id="name-double-space"),
    pytest.param("N.Y.", "NY", id="code-with-periods"),
    pytest.param("N. Y.", "NY", id="code-with-periods-and-space"),
    pytest.param("Calif.", "CA", id="ap-abbreviation"),
    pytest.param("W.Va.", "WV", id="ap-abbreviation-two-words"),
    pytest.param("West Virginia", "WV", id="west-virginia"),
    pytest.param("Washington", "WA", id="washington-state-name"),
    pytest.param("Washington State", "WA", id="washington-state-alias"),
    pytest.param("Hawai\u02bbi", "HI", id="hawaii-with-okina"),
    pytest.param("district of columbia", "DC", id="dc-name"),
    pytest.param("Washington DC", "DC", id="dc-washington-dc"),
    pytest.param("Washington, D.C.", "DC", id="dc-washington-comma-periods"),
    pytest.param("D.C.", "DC", id="dc-periods"),
    pytest.param("dc", "DC", id="dc-lower"),
    pytest.param("Puerto Rico", "PR", id="territory-puerto-rico"),
    pytest.param("pr", "PR", id="territory-code"),
    pytest.param("Guam", "GU", id="territory-guam"),
    pytest.param("Virgin Islands", "VI", id="territory-virgin-islands"),
    pytest.param("U.S. Virgin Islands", "VI", id="territory-us-virgin-islands"),
    pytest.param("American Samoa", "AS", id="territory-american-samoa"),
    pytest.param("northern mariana islands", "MP", id="territory-northern-mariana"),
    pytest.param("Marshall Islands", "MH", id="freely-associated-marshall-islands"),
    pytest.param("Palau", "PW", id="freely-associated-palau"),
    pytest.param("fm", "FM", id="freely-associated-micronesia-code"),
    pytest.param("AA", "AA", id="military-aa"),
    pytest.param("ae", "AE", id="military-ae-lower"),
    pytest.param("A.P.", "AP", id="military-ap-periods"),
    pytest.param("Armed Forces Europe", "AE", id="military-name"),
    # Traditional abbreviations with periods (GPO Style Manual).
    pytest.param("Tex.", "TX", id="gpo-tex"),
    pytest.param("Nebr.", "NE", id="gpo-nebr"),
    pytest.param("N. Mex.", "NM", id="gpo-n-mex"),
    pytest.param("Penna.", "PA", id="traditional-penna"),
    pytest.param("Wisc", "WI", id="traditional-wisc-without-period"),
    # FIPS PUB 5-2 numeric codes (Census, CMS files).
    pytest.param("06", "CA", id="fips-california"),
    pytest.param("25", "MA", id="fips-massachusetts"),
    pytest.param(" 11 ", "DC", id="fips-dc"),
    pytest.param("72", "PR", id="fips-puerto-rico"),
    # One typo from exactly one state's name.
    pytest.param("Texs", "TX", id="typo-missing-letter"),
    pytest.param("Calfornia", "CA", id="typo-missing-letter-2"),
    pytest.param("Kalifornia", "CA", id="typo-wrong-letter"),
    pytest.param("Mississipi", "MS", id="typo-mississippi"),
    pytest.param("Massachusets", "MA", id="typo-massachusetts"),
    pytest.param("Pensylvania", "PA", id="typo-pennsylvania"),
    pytest.param("Tennesee", "TN", id="typo-tennessee"),
    pytest.param("Virgina", "VA", id="typo-virginia"),
    pytest.param("West Virgina", "WV", id="typo-west-virginia"),
    pytest.param("New Yrok", "NY", id="typo-swapped-letters"),
    pytest.param("Ohoi", "OH", id="typo-short-name-swapped"),
    pytest.param("marshal islands", "MH", id="typo-territory"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_STATES)
def test_normalize_state_accepts(raw: str, expected: str) -> None:
    assert normalize_state(raw) == expected


_ALL_US_PLACES = [*us_states.STATES_AND_TERRITORIES, us_states.DC]


@pytest.mark.parametrize("place", _ALL_US_PLACES, ids=lambda place: place.abbr)
def test_normalize_state_knows_every_state_and_territory(place: Any) -> None:
    assert normalize_state(place.abbr) == place.abbr
    assert normalize_state(place.name) == place.abbr
    assert normalize_state(place.name.upper()) == place.abbr


INVALID_STATES = [
    pytest.param("", "missing_state", id="empty"),
    pytest.param("  . ", "missing_state", id="blank-and-period"),
    pytest.param("Teksis", "invalid_state", id="two-edits-from-texas"),
    pytest.param("Kaliphornia", "invalid_state", id="phonetic-misspelling"),
    pytest.param("Akansas", "invalid_state", id="one-typo-from-arkansas-and-kansas"),
    pytest.param("Carolina", "invalid_state", id="north-or-south"),
    pytest.param("TXX", "invalid_state", id="misspelt-code"),
    pytest.param("Ohi", "invalid_state", id="typo-too-short"),
    pytest.param("XX", "invalid_state", id="unknown-code"),
    pytest.param("Ontario", "invalid_state", id="canadian-province"),
    pytest.param("ON", "invalid_state", id="canadian-province-code"),
    pytest.param("Dakota", "invalid_state", id="obsolete-territory-name"),
    pytest.param("DK", "invalid_state", id="obsolete-territory-code"),
    pytest.param("6", "invalid_state", id="fips-code-one-digit"),
    pytest.param("99", "invalid_state", id="unknown-fips-code"),
    pytest.param("3", "invalid_state", id="digit"),
    pytest.param("Texas!", "invalid_state", id="punctuation"),
    pytest.param("New York City", "invalid_state", id="city"),
    pytest.param("T", "invalid_state", id="one-letter"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_STATES)
def test_normalize_state_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_state, raw, code)


def test_normalize_state_refuses_what_us_lookup_would_guess() -> None:
    # us.states.lookup matches names by metaphone and would turn these into Texas and
    # California; they are more than one typo away from the names.
    assert us_states.lookup("Teksis") == us_states.TX
    assert us_states.lookup("Kaliphornia") == us_states.CA
    assert_rejected(normalize_state, "Teksis", "invalid_state")
    assert_rejected(normalize_state, "Kaliphornia", "invalid_state")


def test_a_typo_close_to_two_states_says_so() -> None:
    error = assert_rejected(normalize_state, "Akansas", "invalid_state")
    assert "more than one state" in str(error)


@pytest.mark.parametrize("place", _ALL_US_PLACES, ids=lambda place: place.abbr)
def test_every_fips_code_is_its_state(place: Any) -> None:
    assert normalize_state(place.fips) == place.abbr


# --------------------------------------------------------------------------------------------
# normalize_postal_code
# --------------------------------------------------------------------------------------------

VALID_POSTAL_CODES = [
    pytest.param("12345", "12345", id="zip5"),
    pytest.param("02134", "02134", id="zip5-leading-zero"),
    pytest.param("  12345 ", "12345", id="zip5-padded"),
    pytest.param("12345-6789", "12345-6789", id="zip9-dash"),
    pytest.param("12345 6789", "12345-6789", id="zip9-space"),
    pytest.param("123456789", "12345-6789", id="zip9-digits-only"),
    pytest.param("12345 - 6789", "12345-6789", id="zip9-spaced-dash"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_POSTAL_CODES)
def test_normalize_postal_code_accepts(raw: str, expected: str) -> None:
    assert normalize_postal_code(raw) == expected


INVALID_POSTAL_CODES = [
    pytest.param("", "missing_postal_code", id="empty"),
    pytest.param(" \t ", "missing_postal_code", id="blank"),
    pytest.param("1234", "invalid_postal_code", id="four-digits"),
    pytest.param("123456", "invalid_postal_code", id="six-digits"),
    pytest.param("12345-678", "invalid_postal_code", id="short-plus4"),
    pytest.param("12345-", "invalid_postal_code", id="dangling-dash"),
    pytest.param("12345-6789-1", "invalid_postal_code", id="extra-group"),
    pytest.param("ABCDE", "invalid_postal_code", id="letters"),
    pytest.param("K1A 0B1", "invalid_postal_code", id="canadian-postal-code"),
    pytest.param("00000", "invalid_postal_code", id="all-zero-placeholder"),
    pytest.param("\uff11\uff12\uff13\uff14\uff15", "invalid_postal_code", id="full-width-digits"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_POSTAL_CODES)
def test_normalize_postal_code_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_postal_code, raw, code)


# --------------------------------------------------------------------------------------------
# normalize_birth_date
# --------------------------------------------------------------------------------------------

VALID_BIRTH_DATES = [
    pytest.param("1990-04-01", "1990-04-01", id="iso"),
    pytest.param("1990/04/01", "1990-04-01", id="iso-slashes"),
    pytest.param("1990.04.01", "1990-04-01", id="iso-dots"),
    pytest.param("1990-4-1", "1990-04-01", id="iso-single-digits"),
    pytest.param("19900401", "1990-04-01", id="iso-basic"),
    pytest.param("04/01/1990", "1990-04-01", id="us-slashes"),
    pytest.param("4/1/1990", "1990-04-01", id="us-single-digits"),
    pytest.param("04-01-1990", "1990-04-01", id="us-dashes"),
    pytest.param("04 / 01 / 1990", "1990-04-01", id="us-spaced-slashes"),
    pytest.param("12/31/1990", "1990-12-31", id="us-day-above-12"),
    # Day first, where month first is no date: one reading.
    pytest.param("25/09/2003", "2003-09-25", id="day-first-slashes"),
    pytest.param("25.09.2003", "2003-09-25", id="day-first-dots"),
    pytest.param("13/01/1990", "1990-01-13", id="day-first-13"),
    pytest.param("25 09 2003", "2003-09-25", id="day-first-spaces"),
    # The same date both ways.
    pytest.param("05.05.2003", "2003-05-05", id="same-both-ways-dots"),
    pytest.param("1990 04 01", "1990-04-01", id="iso-spaces"),
    pytest.param("  04/01/1990 ", "1990-04-01", id="padded"),
    pytest.param("April 1, 1990", "1990-04-01", id="month-name-first"),
    pytest.param("Apr 1 1990", "1990-04-01", id="month-abbreviation-no-comma"),
    pytest.param("1 April 1990", "1990-04-01", id="day-first-month-name"),
    pytest.param("1st Apr. 1990", "1990-04-01", id="ordinal-and-period"),
    pytest.param("01-APR-1990", "1990-04-01", id="dd-mon-yyyy-upper"),
    pytest.param("april 1,1990", "1990-04-01", id="lower-case-no-space"),
    pytest.param("Sept 30, 1990", "1990-09-30", id="sept"),
    pytest.param("25 Sep 2003", "2003-09-25", id="day-month-abbreviation-year"),
    pytest.param("September 25, 2003", "2003-09-25", id="month-day-year"),
    pytest.param("3rd of May 2001", "2001-05-03", id="ordinal-of-month"),
    pytest.param("the 3rd of May, 2001", "2001-05-03", id="the-ordinal-of-month"),
    pytest.param("2001 May 3", "2001-05-03", id="year-month-day-words"),
    pytest.param("Sunday, April 1, 1990", "1990-04-01", id="matching-weekday"),
    pytest.param("Sun 1 Apr 1990", "1990-04-01", id="matching-weekday-abbreviation"),
    pytest.param("1990-04-01T00:00:00", "1990-04-01", id="naive-midnight"),
    pytest.param("1990-04-01T13:45:00", "1990-04-01", id="naive-time-of-birth"),
    pytest.param("1990-04-01T00:00:00Z", "1990-04-01", id="utc-midnight"),
    pytest.param("1990-04-01T00:00:00.000+02:00", "1990-04-01", id="offset-midnight"),
    pytest.param("2003-09-25T00:00:00Z", "2003-09-25", id="issue-utc-midnight"),
    pytest.param("2003-09-25 10:49", "2003-09-25", id="iso-space-local-time"),
    pytest.param("2003-09-25T10:49:07Z", "2003-09-25", id="utc-time-not-a-midnight"),
    pytest.param("1990-04-01T05:00:00Z", "1990-04-01", id="utc-midnight-of-the-same-day"),
    pytest.param("9/25/2003 10:49", "2003-09-25", id="us-date-and-time"),
    pytest.param("9/25/2003 12:00:00 AM", "2003-09-25", id="spreadsheet-export-midnight"),
    pytest.param("9/25/2003 1:05 PM", "2003-09-25", id="twelve-hour-time"),
    pytest.param("25 Sep 2003, 10:49", "2003-09-25", id="month-name-and-time"),
    pytest.param("02/29/2000", "2000-02-29", id="leap-day-2000"),
    pytest.param("2024-06-15", "2024-06-15", id="born-today"),
    pytest.param("1894-06-15", "1894-06-15", id="exactly-130-years"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_BIRTH_DATES)
def test_normalize_birth_date_accepts(raw: str, expected: str) -> None:
    result = normalize_birth_date(raw, today=TODAY)
    assert result == expected
    assert FHIR_FULL_DATE_RE.fullmatch(result)


INVALID_BIRTH_DATES = [
    pytest.param("", "missing_date", id="empty"),
    pytest.param("   ", "missing_date", id="blank"),
    pytest.param("04/01/90", "ambiguous_date", id="two-digit-year"),
    pytest.param("01/02/03", "ambiguous_date", id="every-part-two-digits"),
    pytest.param("10.09.2003", "ambiguous_date", id="dots-both-readings"),
    pytest.param("04.01.1990", "ambiguous_date", id="dots-both-readings-2"),
    pytest.param("01 02 2003", "ambiguous_date", id="spaces-both-readings"),
    pytest.param("4-1-90", "ambiguous_date", id="two-digit-year-dashes"),
    pytest.param("90-04-01", "ambiguous_date", id="two-digit-year-first"),
    pytest.param("900401", "ambiguous_date", id="six-digits"),
    pytest.param("Apr 1 90", "ambiguous_date", id="month-name-two-digit-year"),
    pytest.param("1990-03-31T22:00:00Z", "ambiguous_date", id="utc-shifted-local-midnight"),
    pytest.param("1990-04-01T05:00:00-05:00", "ambiguous_date", id="offset-not-midnight"),
    pytest.param("2003-09-24T23:00:00.000Z", "ambiguous_date", id="toisostring-from-plus-one"),
    pytest.param("1990", "incomplete_date", id="year-only"),
    pytest.param("1990-04", "incomplete_date", id="year-month"),
    pytest.param("04/1990", "incomplete_date", id="month-year"),
    pytest.param("April 1990", "incomplete_date", id="month-name-year"),
    pytest.param("April 1", "incomplete_date", id="month-name-day"),
    pytest.param("April", "incomplete_date", id="month-name-only"),
    pytest.param("02/30/1990", "invalid_date", id="february-30"),
    pytest.param("1990-02-29", "invalid_date", id="not-a-leap-year"),
    pytest.param("02/29/1900", "invalid_date", id="1900-not-a-leap-year"),
    pytest.param("13/25/1990", "invalid_date", id="neither-reading"),
    pytest.param("31/31/1990", "invalid_date", id="neither-reading-31"),
    pytest.param("1990-13-01", "invalid_date", id="iso-month-13"),
    pytest.param("1990-04-31", "invalid_date", id="april-31"),
    pytest.param("19901301", "invalid_date", id="iso-basic-month-13"),
    pytest.param("04011990", "invalid_date", id="mmddyyyy-without-separators"),
    pytest.param("0000-01-01", "invalid_date", id="year-zero"),
    pytest.param("04/01-1990", "invalid_date", id="mixed-separators"),
    pytest.param("1990-04-01T25:00:00", "invalid_date", id="hour-25"),
    pytest.param("1990-04-01T00:00:00+15:00", "invalid_date", id="offset-out-of-range"),
    pytest.param("not a date", "invalid_date", id="text"),
    pytest.param("Texas 1990", "invalid_date", id="unknown-word"),
    pytest.param("Monday, April 1, 1990", "invalid_date", id="weekday-not-the-dates"),
    pytest.param("9/25/2003 25:00", "invalid_date", id="time-hour-25"),
    pytest.param("9/25/2003 13:00 PM", "invalid_date", id="time-13-pm"),
    pytest.param("April 1 April 1990", "invalid_date", id="two-months"),
    pytest.param("April 1 1990 12", "invalid_date", id="extra-number"),
    pytest.param("April 199 1990", "invalid_date", id="three-digit-number"),
    pytest.param("April 1, 1990 ???", "invalid_date", id="stray-punctuation"),
    pytest.param("\u0661\u0669\u0669\u0660-04-01", "invalid_date", id="non-ascii-digits"),
    pytest.param("2024-06-16", "birth_date_in_future", id="tomorrow"),
    pytest.param("12/31/2099", "birth_date_in_future", id="far-future"),
    pytest.param("1894-06-14", "birth_date_too_old", id="130-years-and-a-day"),
    pytest.param("1800-01-01", "birth_date_too_old", id="nineteenth-century"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_BIRTH_DATES)
def test_normalize_birth_date_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_birth_date, raw, code, today=TODAY)


def test_normalize_birth_date_day_first_message_names_expected_order() -> None:
    error = assert_rejected(normalize_birth_date, "13/25/1990", "invalid_date", today=TODAY)
    assert "MM/DD/YYYY" in str(error) and "DD/MM/YYYY" in str(error)


def test_a_date_with_two_readings_names_both_and_how_to_fix_it() -> None:
    """Both readings by their pattern (never the value, which is PHI), and the two ways
    out: ISO 8601, or the form's date_order."""
    error = assert_rejected(normalize_birth_date, "10.09.2003", "ambiguous_date", today=TODAY)
    assert "MM.DD.YYYY" in str(error) and "DD.MM.YYYY" in str(error)
    assert "YYYY-MM-DD" in str(error) and "date_order" in str(error)
    assert "2003" not in str(error) and "09" not in str(error)


@pytest.mark.parametrize(
    ("raw", "order", "expected"),
    [
        pytest.param("10.09.2003", "DMY", "2003-09-10", id="dots-day-first"),
        pytest.param("10.09.2003", "MDY", "2003-10-09", id="dots-month-first"),
        pytest.param("01/02/2003", "DMY", "2003-02-01", id="slashes-day-first"),
        pytest.param("01/02/2003", None, "2003-01-02", id="slashes-us-default"),
        pytest.param("01-02-2003", None, "2003-01-02", id="dashes-us-default"),
        # one reading whatever the order says
        pytest.param("25/09/2003", "MDY", "2003-09-25", id="one-reading-despite-mdy"),
        pytest.param("09/25/2003", "DMY", "2003-09-25", id="one-reading-despite-dmy"),
        pytest.param("2003-09-10", "DMY", "2003-09-10", id="iso-despite-dmy"),
        pytest.param("10 Sep 2003", "MDY", "2003-09-10", id="month-name-despite-mdy"),
    ],
)
def test_date_order_reads_the_forms_with_two_readings(raw: str, order: Any, expected: str) -> None:
    assert normalize_date(raw, date_order=order) == expected
    assert normalize_birth_date(raw, today=TODAY, date_order=order) == expected


@pytest.mark.parametrize(
    ("raw", "order"),
    [
        pytest.param("10/09/2003", "YMD", id="year-first-order-settles-nothing-here"),
        pytest.param("10.09.2003", None, id="dots-without-order"),
        pytest.param("01/02/03", "MDY", id="two-digit-year-with-order"),
        pytest.param("01/02/03", "YMD", id="two-digit-year-year-first"),
    ],
)
def test_date_order_does_not_settle_what_it_cannot(raw: str, order: Any) -> None:
    assert_rejected(normalize_date, raw, "ambiguous_date", date_order=order)


# Every ambiguous or conflicting form. None of them may ever come out as a date, with any
# date_order (the second list: without one): "nothing is stored differently from what the
# sender meant".
ALL_ORDERS = (None, "MDY", "DMY", "YMD")
NEVER_GUESSED_DATES = [
    pytest.param("01/02/03", ALL_ORDERS, id="all-two-digit"),
    pytest.param("04/01/90", ALL_ORDERS, id="two-digit-year"),
    pytest.param("900401", ALL_ORDERS, id="six-digits"),
    pytest.param("Apr 1 90", ALL_ORDERS, id="month-name-two-digit-year"),
    pytest.param("04011990", ALL_ORDERS, id="mmddyyyy-without-separators"),
    pytest.param("1990-03-31T22:00:00Z", ALL_ORDERS, id="local-midnight-in-utc"),
    pytest.param("2003-09-24T23:00:00.000Z", ALL_ORDERS, id="toisostring"),
    pytest.param("1990-04-01T05:00:00-05:00", ALL_ORDERS, id="offset-not-midnight"),
    pytest.param("Monday, April 1, 1990", ALL_ORDERS, id="weekday-contradicts-date"),
    pytest.param("April 1 April 1990", ALL_ORDERS, id="two-months"),
    pytest.param("Texas 1990", ALL_ORDERS, id="word"),
    pytest.param("10.09.2003", (None, "YMD"), id="dots-both-readings"),
    pytest.param("01 02 2003", (None, "YMD"), id="spaces-both-readings"),
    pytest.param("01/02/2003", ("YMD",), id="slashes-year-first-order"),
]


@pytest.mark.parametrize(("raw", "orders"), NEVER_GUESSED_DATES)
def test_no_wrong_date_is_ever_stored(raw: str, orders: tuple[Any, ...]) -> None:
    for order in orders:
        with pytest.raises(MappingError):
            normalize_date(raw, date_order=order)
        with pytest.raises(MappingError):
            normalize_birth_date(raw, today=TODAY, date_order=order)


@pytest.mark.parametrize(
    ("raw", "dropped"),
    [
        pytest.param("2003-09-25T10:49:00Z", True, id="utc-time"),
        pytest.param("2003-09-25 10:49", True, id="local-time"),
        pytest.param("9/25/2003 12:00:00 PM", True, id="noon"),
        pytest.param("2003-09-25T00:00:00Z", False, id="midnight-is-a-date"),
        pytest.param("9/25/2003 12:00:00 AM", False, id="midnight-12-hour"),
        pytest.param("2003-09-25", False, id="date"),
    ],
)
def test_a_dropped_time_of_day_is_reported(raw: str, dropped: bool) -> None:
    parsed = parse_birth_date(raw, today=TODAY)
    assert parsed.value == dt.date(2003, 9, 25)
    assert parsed.time_dropped is dropped
    assert parse_date(raw).time_dropped is dropped


def test_normalize_birth_date_defaults_today_to_the_current_date() -> None:
    assert normalize_birth_date("1990-04-01") == "1990-04-01"
    tomorrow = dt.date.today() + dt.timedelta(days=1)
    assert_rejected(normalize_birth_date, tomorrow.isoformat(), "birth_date_in_future")


def test_normalize_birth_date_accepts_a_datetime_as_today() -> None:
    today = dt.datetime(2024, 6, 15, 23, 59, tzinfo=UTC)
    assert normalize_birth_date("2024-06-15", today=today) == "2024-06-15"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param("1894-02-28", None, id="leap-day-today-oldest-allowed"),
        pytest.param("1894-02-27", "birth_date_too_old", id="leap-day-today-one-day-too-old"),
    ],
)
def test_normalize_birth_date_age_limit_when_today_is_29_february(
    raw: str, code: str | None
) -> None:
    leap_day = dt.date(2024, 2, 29)
    if code is None:
        assert normalize_birth_date(raw, today=leap_day) == raw
    else:
        assert_rejected(normalize_birth_date, raw, code, today=leap_day)


# --------------------------------------------------------------------------------------------
# normalize_email
# --------------------------------------------------------------------------------------------

VALID_EMAILS = [
    pytest.param("jane.doe@example.com", "jane.doe@example.com", id="plain"),
    pytest.param(" Jane.Doe@Example.COM ", "jane.doe@example.com", id="padded-mixed-case"),
    pytest.param("jane+intake@mail.example.org", "jane+intake@mail.example.org", id="plus-tag"),
    pytest.param("o'brien@example.ie", "o'brien@example.ie", id="apostrophe"),
    pytest.param("j@e.co", "j@e.co", id="short"),
    pytest.param("Jane@Bücher.DE", "jane@bücher.de", id="idn-unicode"),
    pytest.param("jane@xn--bcher-kva.de", "jane@bücher.de", id="idn-a-label-same-as-unicode"),
    pytest.param("jane@mail.XN--BCHER-KVA.de", "jane@mail.bücher.de", id="idn-a-label-upper"),
    pytest.param("jane@xn--zz.de", "jane@xn--zz.de", id="invalid-a-label-kept-as-typed"),
    pytest.param("jane@i❤.ws", "jane@i❤.ws", id="idna2003-emoji-domain-kept-as-typed"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_EMAILS)
def test_normalize_email_accepts(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


INVALID_EMAILS = [
    pytest.param("", "missing_email", id="empty"),
    pytest.param(" \n", "missing_email", id="blank"),
    pytest.param("jane.doe", "invalid_email", id="no-at"),
    pytest.param("jane.doe@", "invalid_email", id="no-domain"),
    pytest.param("@example.com", "invalid_email", id="no-local-part"),
    pytest.param("jane.doe@example", "invalid_email", id="domain-without-dot"),
    pytest.param("jane@@example.com", "invalid_email", id="double-at"),
    pytest.param("jane@doe@example.com", "invalid_email", id="two-ats"),
    pytest.param("jane doe@example.com", "invalid_email", id="space-in-local-part"),
    pytest.param("jane@exa mple.com", "invalid_email", id="space-in-domain"),
    pytest.param("jane@example..com", "invalid_email", id="empty-domain-label"),
    pytest.param("jane@.example.com", "invalid_email", id="domain-leading-dot"),
    pytest.param("jane@example.com.", "invalid_email", id="domain-trailing-dot"),
    pytest.param("jane\x00@example.com", "invalid_email", id="control-character"),
    pytest.param("a" * 250 + "@example.com", "invalid_email", id="longer-than-254"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_EMAILS)
def test_normalize_email_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_email, raw, code)


# --------------------------------------------------------------------------------------------
# normalize_name
# --------------------------------------------------------------------------------------------

VALID_NAMES = [
    pytest.param("  Mary   Ann ", "Mary Ann", id="collapse-spaces"),
    pytest.param("Mary\tAnn\n", "Mary Ann", id="tab-and-newline"),
    pytest.param("Mary\u00a0Ann", "Mary Ann", id="no-break-space"),
    pytest.param("McDonald", "McDonald", id="keeps-inner-capital"),
    pytest.param("de la Cruz", "de la Cruz", id="keeps-lower-particles"),
    pytest.param("O'Brien", "O'Brien", id="apostrophe"),
    pytest.param("Smith-Jones", "Smith-Jones", id="hyphen"),
    pytest.param("JOHNSON", "JOHNSON", id="keeps-upper-case"),
    pytest.param("Jose\u0301", "Jos\u00e9", id="nfc-composes-accent"),
    pytest.param("Nguy\u1ec5n", "Nguy\u1ec5n", id="vietnamese"),
    pytest.param("\u674e", "\u674e", id="cjk-single-character"),
    pytest.param("Henry VIII", "Henry VIII", id="roman-numerals"),
    pytest.param("Jane 2nd", "Jane 2nd", id="letters-and-digits"),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_NAMES)
def test_normalize_name_accepts(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


INVALID_NAMES = [
    pytest.param("", "missing_name", id="empty"),
    pytest.param("   ", "missing_name", id="blank"),
    pytest.param("\t\n", "missing_name", id="whitespace-controls-only"),
    pytest.param("12345", "invalid_name", id="digits-only"),
    pytest.param("  42  ", "invalid_name", id="digits-padded"),
    pytest.param("-- .", "invalid_name", id="punctuation-only"),
    pytest.param("Mary\x00Ann", "invalid_name", id="nul"),
    pytest.param("Mary\x1cAnn", "invalid_name", id="file-separator"),
    pytest.param("Mary\x0bAnn", "invalid_name", id="vertical-tab"),
    pytest.param("Mary\x7f", "invalid_name", id="delete"),
    pytest.param("Mary\x85Ann", "invalid_name", id="c1-next-line"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_NAMES)
def test_normalize_name_rejects(raw: str, code: str) -> None:
    assert_rejected(normalize_name, raw, code)


# --------------------------------------------------------------------------------------------
# parse_datetime
# --------------------------------------------------------------------------------------------

VALID_DATETIMES = [
    pytest.param("2024-05-01T12:00:00Z", dt.datetime(2024, 5, 1, 12, tzinfo=UTC), id="utc-z"),
    pytest.param(" 2024-05-01T12:00:00Z\n", dt.datetime(2024, 5, 1, 12, tzinfo=UTC), id="padded"),
    pytest.param("2024-05-01t12:00:00z", dt.datetime(2024, 5, 1, 12, tzinfo=UTC), id="lower-t-z"),
    pytest.param(
        "2024-05-01T12:00:00.123+02:00",
        dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=PLUS_2),
        id="millis-plus-offset",
    ),
    pytest.param(
        "2024-05-01 12:00:00+00:00", dt.datetime(2024, 5, 1, 12, tzinfo=UTC), id="space-separator"
    ),
    pytest.param(
        "2024-05-01T12:00:00-05:00",
        dt.datetime(2024, 5, 1, 12, tzinfo=MINUS_5),
        id="negative-offset",
    ),
    pytest.param(
        "2024-05-01T12:00:00+0530",
        dt.datetime(2024, 5, 1, 12, tzinfo=PLUS_530),
        id="basic-offset",
    ),
    pytest.param(
        "2024-05-01T12:00:00+02", dt.datetime(2024, 5, 1, 12, tzinfo=PLUS_2), id="hour-offset"
    ),
    pytest.param("2024-05-01T12:00Z", dt.datetime(2024, 5, 1, 12, tzinfo=UTC), id="no-seconds"),
    pytest.param(
        "2024-05-01T12:00:00.1234567Z",
        dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        id="nanoseconds-truncated",
    ),
    pytest.param(
        "2024-02-29T23:59:59-00:00",
        dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
        id="leap-day-unknown-offset",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), VALID_DATETIMES)
def test_parse_datetime_accepts(raw: str, expected: dt.datetime) -> None:
    result = parse_datetime(raw)
    assert result == expected
    assert result.utcoffset() == expected.utcoffset()


INVALID_DATETIMES = [
    pytest.param("", "missing_datetime", id="empty"),
    pytest.param("  ", "missing_datetime", id="blank"),
    pytest.param("2024-05-01T12:00:00", "missing_timezone", id="naive"),
    pytest.param("2024-05-01T12:00:00.500", "missing_timezone", id="naive-with-fraction"),
    pytest.param("2024-05-01", "invalid_datetime", id="date-only"),
    pytest.param("yesterday", "invalid_datetime", id="text"),
    pytest.param("05/01/2024 12:00 PM", "invalid_datetime", id="us-format"),
    pytest.param("2024-13-01T00:00:00Z", "invalid_datetime", id="month-13"),
    pytest.param("2024-02-30T00:00:00Z", "invalid_datetime", id="february-30"),
    pytest.param("2023-02-29T00:00:00Z", "invalid_datetime", id="not-a-leap-year"),
    pytest.param("2024-05-01T24:00:00Z", "invalid_datetime", id="hour-24"),
    pytest.param("2024-05-01T12:60:00Z", "invalid_datetime", id="minute-60"),
    pytest.param("2024-05-01T12:00:00+15:00", "invalid_datetime", id="offset-too-large"),
    pytest.param("2024-05-01T12:00:00+02:60", "invalid_datetime", id="offset-minute-60"),
    pytest.param("2024-05-01T12:00:00 Z", "invalid_datetime", id="space-before-z"),
    pytest.param("0000-01-01T00:00:00Z", "invalid_datetime", id="year-zero"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_DATETIMES)
def test_parse_datetime_rejects(raw: str, code: str) -> None:
    assert_rejected(parse_datetime, raw, code)


# --------------------------------------------------------------------------------------------
# to_fhir_instant
# --------------------------------------------------------------------------------------------

FHIR_INSTANTS = [
    pytest.param(
        dt.datetime(2024, 5, 1, 12, tzinfo=PLUS_2), "2024-05-01T12:00:00+02:00", id="plus-2"
    ),
    pytest.param(dt.datetime(2024, 5, 1, 12, tzinfo=UTC), "2024-05-01T12:00:00Z", id="utc-as-z"),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(0))),
        "2024-05-01T12:00:00Z",
        id="zero-offset-as-z",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 7, 5, 9, tzinfo=MINUS_5), "2024-05-01T07:05:09-05:00", id="minus-5"
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, tzinfo=MINUS_330),
        "2024-05-01T12:00:00-03:30",
        id="minus-3-30",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, tzinfo=PLUS_530),
        "2024-05-01T12:00:00+05:30",
        id="plus-5-30",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
        "2024-05-01T12:00:00.123Z",
        id="milliseconds",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, 0, 0, 7000, tzinfo=UTC),
        "2024-05-01T12:00:00.007Z",
        id="milliseconds-zero-padded",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "2024-05-01T12:00:00.123Z",
        id="microseconds-truncated",
    ),
    pytest.param(
        dt.datetime(2024, 5, 1, 12, 0, 0, 999, tzinfo=UTC),
        "2024-05-01T12:00:00Z",
        id="sub-millisecond-dropped",
    ),
    pytest.param(
        dt.datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05Z", id="four-digit-year"
    ),
]


@pytest.mark.parametrize(("value", "expected"), FHIR_INSTANTS)
def test_to_fhir_instant_formats(value: dt.datetime, expected: str) -> None:
    result = to_fhir_instant(value)
    assert result == expected
    assert FHIR_INSTANT_RE.fullmatch(result)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param(dt.datetime(2024, 5, 1, 12), "missing_timezone", id="naive"),
        pytest.param(
            dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(seconds=30))),
            "invalid_datetime",
            id="offset-with-seconds",
        ),
    ],
)
def test_to_fhir_instant_rejects(value: dt.datetime, code: str) -> None:
    with pytest.raises(MappingError) as info:
        to_fhir_instant(value)
    assert info.value.code == code


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("2024-05-01T12:00:00+02:00", id="offset"),
        pytest.param("2024-05-01T12:00:00.123-05:00", id="millis-negative-offset"),
        pytest.param("2024-12-31T23:59:59Z", id="utc"),
    ],
)
def test_parse_datetime_then_to_fhir_instant_round_trips(raw: str) -> None:
    assert to_fhir_instant(parse_datetime(raw)) == raw


# --------------------------------------------------------------------------------------------
# Invisible characters that copy-paste brings along (zero-width space, BOM, soft hyphen,
# bidirectional marks)
# --------------------------------------------------------------------------------------------

ZWSP, BOM, ZWJ, ZWNJ, LRM, SHY = "\u200b", "\ufeff", "\u200d", "\u200c", "\u200e", "\u00ad"

INVISIBLE_CHARACTER_INPUTS = [
    pytest.param(normalize_name, f"Ma{ZWSP}ry", "Mary", id="name-inner-zwsp"),
    pytest.param(normalize_name, f"{ZWSP}Mary{ZWSP}", "Mary", id="name-zwsp-ends"),
    pytest.param(normalize_name, f"{BOM}Mary", "Mary", id="name-leading-bom"),
    pytest.param(normalize_name, f"Mary{ZWJ}", "Mary", id="name-trailing-zwj"),
    pytest.param(normalize_name, f"Mary {ZWSP} Ann", "Mary Ann", id="name-zwsp-between-words"),
    pytest.param(normalize_name, f"{LRM}Jos\u00e9{LRM}", "Jos\u00e9", id="name-bidi-marks"),
    pytest.param(normalize_name, f"Anne{SHY}Marie", "AnneMarie", id="name-soft-hyphen"),
    # Inside a word the joiners are letters' business (Persian, emoji): kept.
    pytest.param(
        normalize_name,
        f"\u0645\u06cc{ZWNJ}\u062e\u0648\u0627\u0647\u0645",
        f"\u0645\u06cc{ZWNJ}\u062e\u0648\u0627\u0647\u0645",
        id="name-inner-zwnj-kept",
    ),
    pytest.param(normalize_email, f"jane@example.com{ZWSP}", "jane@example.com", id="email-zwsp"),
    pytest.param(normalize_email, f"ja{ZWSP}ne@example.com", "jane@example.com", id="email-inner"),
    pytest.param(normalize_email, f"{BOM}Jane@Example.com", "jane@example.com", id="email-bom"),
    pytest.param(normalize_phone, f"415 555 2671{ZWSP}", "+14155552671", id="phone-zwsp"),
    pytest.param(normalize_phone, f"{LRM}+44 20 7946 0958", "+442079460958", id="phone-lrm"),
    pytest.param(normalize_state, f"CA{ZWSP}", "CA", id="state-zwsp"),
    pytest.param(normalize_postal_code, f"94107{ZWSP}", "94107", id="zip-zwsp"),
    pytest.param(normalize_birth_date, f"{BOM}1980-02-03", "1980-02-03", id="birth-date-bom"),
]


@pytest.mark.parametrize(("func", "raw", "expected"), INVISIBLE_CHARACTER_INPUTS)
def test_invisible_characters_are_deleted(
    func: Callable[[str], str], raw: str, expected: str
) -> None:
    assert func(raw) == expected


@pytest.mark.parametrize("raw", [ZWSP, f"{BOM}{ZWSP} {ZWJ}"])
def test_a_name_of_invisible_characters_only_is_missing(raw: str) -> None:
    assert_rejected(normalize_name, raw, "missing_name")
