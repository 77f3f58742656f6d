"""The hot path of decoding: a usage event that plainly keeps every rule, read in a few µs.

`msgspec` parses the JSON into a typed struct in C, which already checks most rules (types,
lengths, token bounds, the fixed values); decimals are kept as their raw JSON text and read from
their literal digits, never through a binary float. A few plain checks then accept the event
only when they are sure the reference model (`UsageEvent`, which states the contract) would
accept it with the same values, and the stored row is built straight from the struct. Whatever
they are not sure of — any broken rule, but also rare valid spellings such as a lower-case `z`
in a time, an id with a character `str.isprintable` refuses, or a field this pipeline does not
know — returns None, and the caller asks the reference, which also words the DLQ reason. So the
fast path may only ever say "valid, and these are its values"; a property test holds it to that.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType
from pydantic_core import PydanticCustomError

from llm_usage.domain.corrections import Action, Correction
from llm_usage.domain.money import cents_to_usd, usd_to_cents
from llm_usage.schemas.usage_correction import MAX_REASON_LENGTH
from llm_usage.schemas.usage_event import (
    BIGINT_MAX,
    EVENT_FIELD_COUNT,
    FIRST_STORABLE_INSTANT,
    LAST_STORABLE_INSTANT,
    MAX_CENTS_DISAGREEMENT,
    MAX_FUTURE_SKEW,
    MAX_TEXT_LENGTH,
    MAX_WHOLE_DIGITS,
    UnpricedEvent,
    UsageRow,
    exact_decimal,
)

_Id = Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]
_Text = Annotated[str, Meta(max_length=MAX_TEXT_LENGTH)] | UnsetType | None
_Count = Annotated[int, Meta(ge=0, le=BIGINT_MAX)] | UnsetType


class _Event(Struct, kw_only=True, forbid_unknown_fields=True):
    """The event as msgspec reads it; `UNSET` marks a field that was not sent. The fields come
    in `UsageRow`'s order, so the first 20 values of `astuple` are the row's."""

    gateway_request_id: _Id
    tenant_id: _Id
    deployment_id: _Text = UNSET
    user_id: _Text = UNSET
    agent_id: _Text = UNSET
    channel: _Text = UNSET
    feature: _Text = UNSET
    provider: _Text = UNSET
    model: _Text = UNSET
    request_kind: _Text = UNSET
    input_tokens: _Count = UNSET
    output_tokens: _Count = UNSET
    cached_input_tokens: _Count = UNSET
    reasoning_tokens: _Count = UNSET
    total_tokens: _Count = UNSET
    upstream_cost_usd: Raw | UnsetType = UNSET  # msgspec allows no other type beside Raw
    customer_charge_usd: Raw | UnsetType = UNSET
    customer_charge_cents: Annotated[int, Meta(ge=0, le=BIGINT_MAX)] | UnsetType | None = UNSET
    markup_mode: _Text = UNSET
    occurred_at: str
    # msgspec refuses `true` and `1.0` for these, as the reference does (EVENT_TYPE and
    # SCHEMA_VERSION; a unit test holds them equal).
    event_type: Literal["llm_usage_recorded"] | UnsetType = UNSET
    schema_version: Literal[1] | UnsetType = UNSET


_DECODER = msgspec.json.Decoder(_Event)
_FIELD_COUNT: Final = len(_Event.__struct_fields__)
_ROW_LENGTH: Final = EVENT_FIELD_COUNT
# What a field that was not sent stands for; UNSET where it is derived from other fields.
_ABSENT: Final = (
    *(UNSET, UNSET),  # the ids are required
    *(None,) * 8,  # attribution and description texts
    *(0,) * 4,  # input, output, cached input, reasoning tokens
    UNSET,  # total_tokens: input + output
    None,  # upstream_cost_usd
    UNSET,  # customer_charge_usd: from the cents
    None,  # customer_charge_cents
    None,  # markup_mode
    UNSET,  # occurred_at is required
)
_TOTAL, _UPSTREAM, _USD, _CENTS, _MARKUP, _OCCURRED_AT = range(14, 20)

# Every object key ends with a quote, optional JSON whitespace and a colon.
_KEY_ENDINGS = re.compile(rb'"[ \t\n\r]*:')
_SPACED_KEY_ENDING = re.compile(rb'"[ \t\n\r]+:')
# A NUL can reach a string only as this escape (JSON forbids the raw byte): PostgreSQL text
# cannot hold it. Other escapes are fine: msgspec refuses lone surrogates itself.
_NUL_ESCAPE = b"\\u0000"
# A decimal as a JSON string or number in its plain spelling, within both digit limits. Other
# spellings (exponents, signs, NaN, spaces, 13 whole digits...) go through the reference's own
# `exact_decimal`.
_PLAIN_DECIMAL = re.compile(rb'"?((?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,18})?)"?')
_NUMBER_STARTS = frozenset(bytes([first]) for first in b"-0123456789")
# The usual spelling of RFC 3339 only (upper-case T and Z, at most microseconds): the reference
# decides the rest.
_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"  # Python reads +05:75; pydantic refuses it
)
_new_row = tuple.__new__
# The row's last two fields: whether the price table priced it, and from which row.
_GATEWAY_PRICED: Final = [False, None]
_TO_BE_PRICED: Final = [True, None]
_PLACEHOLDER_CHARGE: Final = Decimal(0)


class _NotSureError(Exception):
    """The fast path cannot vouch for this event: the reference decides."""


def fast_decode(value: bytes, *, now: datetime) -> UsageRow | UnpricedEvent | None:
    """The stored values of the event in `value` if it plainly keeps every rule (unpriced when
    it sent no charge); None when the reference must decide."""
    try:
        event = _DECODER.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    values = msgspec.structs.astuple(event)
    absent = values.count(UNSET)
    if not _each_name_once(value, values, _FIELD_COUNT - absent):
        return None
    try:
        return _row(event, values, absent, now)
    except (_NotSureError, PydanticCustomError, ArithmeticError, ValueError, OverflowError):
        return None


def _each_name_once(raw: bytes, values: tuple[object, ...], fields: int) -> bool:
    """Whether the object in `raw` named no field twice (msgspec, like most parsers, keeps the
    last copy silently), given the values it read for `fields` distinct fields; and whether no
    text holds a NUL, which PostgreSQL text cannot hold."""
    if b"\\" not in raw:
        # No escape anywhere, so every quote opens or closes a string (and no text holds a NUL):
        # two per name given and two per string value. A value overwritten by a repeated name
        # or a string nested in an odd decimal only adds quotes, so equality means each name
        # came once.
        strings = list(map(type, values)).count(str) + _quoted(values[_UPSTREAM])
        strings += _quoted(values[_USD])
        return raw.count(b'"') == 2 * (fields + strings)
    return _key_endings(raw) == fields and _NUL_ESCAPE not in raw


def _quoted(raw: object) -> int:
    return int(type(raw) is Raw and bytes(raw)[:1] == b'"')


def _key_endings(raw: bytes) -> int:
    # Text inside a string can only add matches, so a mismatch means "ask the reference".
    # Serialisers write `"name":` (no space before the colon): bytes.count is ten times faster.
    if _SPACED_KEY_ENDING.search(raw) is None:
        return raw.count(b'":')
    return len(_KEY_ENDINGS.findall(raw))


def _row(
    event: _Event, values: tuple[object, ...], absent: int, now: datetime
) -> UsageRow | UnpricedEvent:
    _require_clean_id(event.gateway_request_id)
    _require_clean_id(event.tenant_id)
    unpriced = event.customer_charge_usd is UNSET and event.customer_charge_cents is UNSET
    derived_absent = (
        (event.total_tokens is UNSET)
        + (event.customer_charge_usd is UNSET)
        + unpriced  # no cents either: the usual shape of an event for the price table
        + (event.event_type is UNSET)
        + (event.schema_version is UNSET)
    )
    row = list(values[:_ROW_LENGTH])
    if absent != derived_absent:  # some field that stands for null or 0 was left out
        row = [d if v is UNSET and d is not UNSET else v for v, d in zip(row, _ABSENT, strict=True)]
    elif unpriced:
        row[_CENTS] = None
    if row[_TOTAL] is UNSET:
        total = row[10] + row[11]  # type: ignore[operator]
        if total > BIGINT_MAX:
            raise _NotSureError
        row[_TOTAL] = total
    upstream = row[_UPSTREAM]
    if upstream is not None:
        row[_UPSTREAM] = _exact_or_null(upstream)  # type: ignore[arg-type]
    row[_OCCURRED_AT] = _occurred_at(row[_OCCURRED_AT], now)  # type: ignore[arg-type]
    if row[_USD] is UNSET and row[_CENTS] is None:
        row[_USD] = _PLACEHOLDER_CHARGE
        row += _TO_BE_PRICED
        return UnpricedEvent(_new_row(UsageRow, row))
    row[_USD] = _charge(row[_USD], row[_CENTS])  # type: ignore[arg-type]
    row += _GATEWAY_PRICED
    return _new_row(UsageRow, row)


def _require_clean_id(value: str) -> None:
    # Printable excludes every control character, NUL and lone surrogate (and some rare valid
    # characters, which the reference then decides).
    if not value.isprintable() or value != value.strip():
        raise _NotSureError


def _exact(raw: Raw) -> Decimal:
    found = _PLAIN_DECIMAL.fullmatch(raw)
    if found is not None:
        return Decimal(found[1].decode())
    return _exact_as_spelled(bytes(raw))


def _exact_or_null(raw: Raw) -> Decimal | None:
    found = _PLAIN_DECIMAL.fullmatch(raw)
    if found is not None:
        return Decimal(found[1].decode())
    text = bytes(raw)
    return None if text == b"null" else _exact_as_spelled(text)


def _exact_as_spelled(text: bytes) -> Decimal:
    """Other spellings (1.5E-7 as a Go float64 writes it, 13 whole digits...) as the reference
    reads them: a string by the contract's rule, a number from its literal digits."""
    if text.startswith(b'"') and b"\\" not in text:
        return exact_decimal(text[1:-1].decode())
    if text[:1] in _NUMBER_STARTS:
        return exact_decimal(Decimal(text.decode()))
    raise _NotSureError


def _charge(usd: Raw | UnsetType, cents: int | None) -> Decimal:
    if usd is not UNSET:
        charge = _exact(usd)
        if cents is not None and abs(usd_to_cents(charge) - cents) > MAX_CENTS_DISAGREEMENT:
            raise _NotSureError
        return charge
    if cents is None:
        raise _NotSureError
    charge = cents_to_usd(cents)
    if charge.adjusted() >= MAX_WHOLE_DIGITS:
        raise _NotSureError
    return charge


def _occurred_at(value: str, now: datetime) -> datetime:
    if _TIME.fullmatch(value) is None:
        raise _NotSureError
    utc = datetime.fromisoformat(value).astimezone(UTC)
    if not FIRST_STORABLE_INSTANT <= utc <= LAST_STORABLE_INSTANT or utc - now > MAX_FUTURE_SKEW:
        raise _NotSureError
    return utc


# ---------------------------------------------------------------------------------------------
# Corrections (`llm_usage_corrected`): the same idea. Only the plain shape is vouched for: no
# escape anywhere in the record, no field the struct does not know (the reference ignores them,
# the fast path leaves them to it), no null among the amended figures, and not both the charge
# and its cents; the reference decides and words everything else.

_Reason = Annotated[str, Meta(min_length=1, max_length=MAX_REASON_LENGTH)]
_Actor = Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]


class _AmendFields(Struct, kw_only=True, forbid_unknown_fields=True):
    input_tokens: _Count = UNSET
    output_tokens: _Count = UNSET
    cached_input_tokens: _Count = UNSET
    reasoning_tokens: _Count = UNSET
    total_tokens: _Count = UNSET
    customer_charge_usd: Raw | UnsetType = UNSET
    customer_charge_cents: _Count = UNSET
    deployment_id: _Text = UNSET
    user_id: _Text = UNSET
    agent_id: _Text = UNSET


class _Correction(Struct, kw_only=True, forbid_unknown_fields=True):
    event_type: Literal["llm_usage_corrected"]
    schema_version: Literal[1] | UnsetType = UNSET
    correction_id: _Id
    gateway_request_id: _Id
    tenant_id: _Id
    action: Literal["void", "amend"]
    fields: _AmendFields | UnsetType | None = UNSET
    reason: _Reason
    actor: _Actor
    occurred_at: str
    event_occurred_at: str | UnsetType | None = UNSET


_CORRECTION_DECODER = msgspec.json.Decoder(_Correction)
_CORRECTION_FIELDS: Final = _Correction.__struct_fields__
_AMEND_FIELDS: Final = _AmendFields.__struct_fields__
_ACTIONS: Final = {"void": Action.VOID, "amend": Action.AMEND}


def fast_decode_correction(value: bytes, *, now: datetime) -> Correction | None:
    """The stored values of the correction in `value` if it plainly keeps every rule; None when
    the reference (`UsageCorrectionEvent`) must decide."""
    if b"\\" in value:  # an escape: the quotes below could not be counted
        return None
    try:
        event = _CORRECTION_DECODER.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    values = msgspec.structs.astuple(event)
    sent = event.fields
    amended = (
        {}
        if sent is None or sent is UNSET
        else {
            name: value
            for name, value in zip(_AMEND_FIELDS, msgspec.structs.astuple(sent), strict=True)
            if value is not UNSET
        }
    )
    names = len(_CORRECTION_FIELDS) - values.count(UNSET) + len(amended)
    strings = list(map(type, values)).count(str) + list(map(type, amended.values())).count(str)
    strings += _quoted(amended.get("customer_charge_usd"))
    if value.count(b'"') != 2 * (names + strings):  # a name given twice, or an odd shape
        return None
    try:
        return _correction(event, amended, now)
    except (_NotSureError, ArithmeticError, ValueError, OverflowError):
        return None


def _correction(event: _Correction, amended: dict[str, object], now: datetime) -> Correction:
    for each in (event.correction_id, event.gateway_request_id, event.tenant_id):
        _require_clean_id(each)
    if (event.action == "amend") != bool(amended) or None in (
        amended.get(name, 0) for name in _AMEND_FIELDS[:7]
    ):
        raise _NotSureError  # a void with fields, an amend without, or a null figure
    if "customer_charge_usd" in amended:
        if "customer_charge_cents" in amended:
            raise _NotSureError  # the reference checks that they agree
        amended["customer_charge_usd"] = _exact(amended["customer_charge_usd"])  # type: ignore[arg-type]
    about = event.event_occurred_at
    if about is UNSET:
        about = None
    return Correction(
        tenant_id=event.tenant_id,
        correction_id=event.correction_id,
        gateway_request_id=event.gateway_request_id,
        action=_ACTIONS[event.action],
        fields=amended,
        reason=event.reason,
        actor=event.actor,
        occurred_at=_occurred_at(event.occurred_at, now),
        event_occurred_at=None if about is None else _occurred_at(about, now),
    )
