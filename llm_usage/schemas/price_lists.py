"""Price lists from outside, read into price rows: LiteLLM's community list
(`model_prices_and_context_window.json`) and a plain CSV.

Numbers are read exactly from their digits (`2.5e-6` per token is 2.5 USD per million, never a
binary float) and held to the usage event's decimal limits once in USD per million tokens. What
a list holds that a row cannot say is skipped or ignored, never guessed, and reported in
`PriceList.ignored` so the person importing sees it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, DecimalException
from pathlib import Path
from typing import Any, NoReturn

from pydantic_core import PydanticCustomError

from llm_usage.domain.money import EXACT_CONTEXT, canonical_decimal
from llm_usage.domain.prices import Price, new_price
from llm_usage.schemas.usage_event import MAX_TEXT_LENGTH, RFC3339_PATTERN, exact_decimal, json_kind

_PER_MILLION = 6
# LiteLLM's `mode`s whose token prices are those of a text generation call, which is what a
# usage event reports; "responses" is OpenAI's Responses API. Embeddings, images, audio,
# realtime, rerank, moderation and search are priced by other units or never reach the gateway's
# usage events, so their entries are skipped.
_TEXT_MODES = frozenset({"chat", "completion", "responses"})
_LITELLM_PROVIDER = "litellm_provider"
_LITELLM_MODE = "mode"
_LITELLM_INPUT = "input_cost_per_token"
_LITELLM_OUTPUT = "output_cost_per_token"
_LITELLM_PER_TOKEN_OPTIONAL = {
    "cache_read_input_token_cost": "cached_input",
    "output_cost_per_reasoning_token": "reasoning",
}
_LITELLM_REQUEST_FEE = "input_cost_per_request"
_LITELLM_USED = frozenset(
    {
        _LITELLM_PROVIDER,
        _LITELLM_MODE,
        _LITELLM_INPUT,
        _LITELLM_OUTPUT,
        _LITELLM_REQUEST_FEE,
        *_LITELLM_PER_TOKEN_OPTIONAL,
    }
)
_LITELLM_TEMPLATE_KEY = "sample_spec"

_CSV_REQUIRED = ("provider", "model", "input", "output")
_CSV_OPTIONAL = ("cached_input", "reasoning", "request_fee_usd", "effective_from")
_RFC3339 = re.compile(RFC3339_PATTERN)


class PriceListError(ValueError):
    """A price list that cannot be read as it stands; the message is one line naming the
    entry (or line) and field at fault."""


@dataclass(frozen=True)
class PriceList:
    """The rows a list yields, and one line for each kind of thing it held that was skipped or
    ignored, in a stable order."""

    prices: list[Price]
    ignored: list[str]


def read_litellm_prices(data: bytes, *, effective_from: datetime) -> PriceList:
    """Rows from LiteLLM's `model_prices_and_context_window.json`, all from `effective_from`.

    Each entry of a text mode (chat, completion, responses, or no mode) with both
    `input_cost_per_token` and `output_cost_per_token` becomes a row: the provider is
    `litellm_provider` and the model is the entry's key exactly as written, including a
    "provider/model" key such as "groq/llama-3.1-8b-instant" (a gateway reports whichever name
    it routed by, so nothing is stripped). `cache_read_input_token_cost` and
    `output_cost_per_reasoning_token` price cached and reasoning tokens (defaults: the input and
    output prices), `input_cost_per_request` is the request fee. A `null` field counts as absent.
    """
    start = _utc(effective_from, "effective_from")
    entries = _litellm_entries(data)
    prices: list[Price] = []
    not_objects: list[str] = []
    no_provider: list[str] = []
    other_modes: Counter[str] = Counter()
    not_token_priced: list[str] = []
    ignored_price_fields: Counter[str] = Counter()
    ignored_other_fields: set[str] = set()
    for model, entry in entries.items():
        if model == _LITELLM_TEMPLATE_KEY:
            continue
        if not isinstance(entry, Mapping):
            not_objects.append(model)
            continue
        mode = entry.get(_LITELLM_MODE)
        if mode is not None and mode not in _TEXT_MODES:
            other_modes[str(mode)] += 1
            continue
        if entry.get(_LITELLM_INPUT) is None or entry.get(_LITELLM_OUTPUT) is None:
            not_token_priced.append(model)
            continue
        provider = entry.get(_LITELLM_PROVIDER)
        if provider is None:
            no_provider.append(model)
            continue
        prices.append(_litellm_row(model, entry, start))
        for field in entry.keys() - _LITELLM_USED:
            if "cost" in field:
                ignored_price_fields[field] += 1
            else:
                ignored_other_fields.add(field)
    ignored = [
        *_skipped_line(not_objects, "that are not JSON objects"),
        *_skipped_line(not_token_priced, f"without both {_LITELLM_INPUT} and {_LITELLM_OUTPUT}"),
        *_skipped_line(no_provider, f"without {_LITELLM_PROVIDER}"),
    ]
    if other_modes:
        modes = ", ".join(f"{mode} {count}" for mode, count in sorted(other_modes.items()))
        ignored.append(
            f"{other_modes.total()} entries skipped whose mode is not one of "
            f"{', '.join(sorted(_TEXT_MODES))}: {modes}"
        )
    if ignored_price_fields:
        fields = ", ".join(
            f"{field} ({count})" for field, count in sorted(ignored_price_fields.items())
        )
        ignored.append(f"price fields ignored (entries having them): {fields}")
    if ignored_other_fields:
        ignored.append(f"other fields ignored: {', '.join(sorted(ignored_other_fields))}")
    return PriceList(prices, ignored)


def read_csv_prices(text: str, *, effective_from: datetime | None = None) -> PriceList:
    """Rows from a CSV with a header: provider,model,input,output and optionally
    cached_input, reasoning, request_fee_usd, effective_from, in any order.

    Prices are USD per million tokens in exact decimal text, the fee is USD per request, and
    `effective_from` is RFC 3339 with an offset; an empty optional cell takes the contract's
    default, an empty `effective_from` takes the argument. Other columns are ignored and listed.
    """
    default_start = None if effective_from is None else _utc(effective_from, "effective_from")
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise PriceListError("line 1: the CSV is empty; it needs a header line")
    columns = [name.strip() for name in header]
    _check_header(columns, has_default_start=default_start is not None)
    known = set(_CSV_REQUIRED) | set(_CSV_OPTIONAL)
    unknown = [name for name in columns if name not in known]
    prices: list[Price] = []
    seen: dict[tuple[str, str, datetime], int] = {}
    for cells in rows:
        line = rows.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(columns):
            raise PriceListError(
                f"line {line}: {len(cells)} cells where the header has {len(columns)}"
            )
        row = dict(zip(columns, (cell.strip() for cell in cells), strict=True))
        price = _csv_row(row, line, default_start)
        key = (price.provider, price.model, price.effective_from)
        if key in seen:
            raise PriceListError(
                f"line {line}: {price.provider}/{price.model} from "
                f"{price.effective_from.isoformat()} is already on line {seen[key]}"
            )
        seen[key] = line
        prices.append(price)
    ignored = [f"columns ignored: {', '.join(unknown)}"] if unknown else []
    return PriceList(prices, ignored)


def read_price_file(path: Path, *, effective_from: datetime | None) -> PriceList:
    """The price list in `path`: LiteLLM's JSON for `.json` (which then needs
    `effective_from`), CSV for `.csv`."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        if effective_from is None:
            raise PriceListError(
                f"{path}: a LiteLLM price list carries no dates; give the time its prices "
                "take effect"
            )
        return read_litellm_prices(path.read_bytes(), effective_from=effective_from)
    if suffix == ".csv":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise PriceListError(f"{path}: not UTF-8 text ({error.reason})") from None
        return read_csv_prices(text, effective_from=effective_from)
    raise PriceListError(
        f"{path}: cannot tell the format from {suffix or 'no suffix'!r}; "
        "use .json (LiteLLM's list) or .csv"
    )


def _litellm_entries(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(
            data,
            parse_float=Decimal,
            parse_int=int,
            parse_constant=_refuse_constant,
            object_pairs_hook=_without_duplicate_keys,
        )
    except (ValueError, RecursionError) as error:
        if isinstance(error, PriceListError):
            raise
        raise PriceListError(f"not a JSON document: {error}") from None
    if not isinstance(parsed, dict):
        raise PriceListError(
            f"a LiteLLM price list is a JSON object of model names, not {json_kind(parsed)}"
        )
    return parsed


def _refuse_constant(name: str) -> NoReturn:
    raise PriceListError(f"{name} is not a JSON number")


def _without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys; a list that names a model twice is ambiguous.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise PriceListError(f"{key!r} appears twice in the same JSON object")
        result[key] = value
    return result


def _litellm_row(model: str, entry: Mapping[str, Any], start: datetime) -> Price:
    provider = entry[_LITELLM_PROVIDER]
    if not isinstance(provider, str):
        raise PriceListError(
            f"{model}: {_LITELLM_PROVIDER} must be a string, not {json_kind(provider)}"
        )
    _check_name(provider, f"{model}: {_LITELLM_PROVIDER}")
    _check_name(model, f"{model}: the model name")

    def per_million(field: str) -> Decimal | None:
        value = entry.get(field)
        return None if value is None else _litellm_number(model, field, value, _PER_MILLION)

    optional = {name: per_million(field) for field, name in _LITELLM_PER_TOKEN_OPTIONAL.items()}
    fee = entry.get(_LITELLM_REQUEST_FEE)
    return new_price(
        provider,
        model,
        start,
        input=_litellm_number(model, _LITELLM_INPUT, entry[_LITELLM_INPUT], _PER_MILLION),
        output=_litellm_number(model, _LITELLM_OUTPUT, entry[_LITELLM_OUTPUT], _PER_MILLION),
        cached_input=optional["cached_input"],
        reasoning=optional["reasoning"],
        request_fee_usd=None
        if fee is None
        else _litellm_number(model, _LITELLM_REQUEST_FEE, fee, 0),
    )


def _litellm_number(model: str, field: str, value: object, scale: int) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise PriceListError(f"{model}: {field} must be a JSON number, not {json_kind(value)}")
    try:
        scaled = Decimal(value).scaleb(scale, EXACT_CONTEXT)
    except DecimalException:
        raise PriceListError(
            f"{model}: {field} {value} has more digits than a price can keep"
        ) from None
    return _exact(
        scaled,
        lambda reason: f"{model}: {field} {value} ({scaled:f} {_unit(scale)}): {reason}",
    )


def _unit(scale: int) -> str:
    return "USD per million tokens" if scale == _PER_MILLION else "USD"


def _exact(value: object, failure: Callable[[str], str]) -> Decimal:
    """`value` held to the usage event's decimal limits, spelt without an exponent."""
    try:
        exact = exact_decimal(value)
    except PydanticCustomError as error:
        raise PriceListError(failure(error.message())) from None
    return Decimal(canonical_decimal(exact))


def _check_name(name: str, where: str) -> None:
    # The same limits as the event's provider and model, so every row can match an event.
    if not name or len(name) > MAX_TEXT_LENGTH or "\x00" in name:
        raise PriceListError(
            f"{where}: must be 1 to {MAX_TEXT_LENGTH} characters without NUL, not {name!r}"
        )


def _skipped_line(models: list[str], why: str) -> Iterable[str]:
    if not models:
        return []
    examples = ", ".join(sorted(models)[:3])
    more = ", …" if len(models) > 3 else ""
    return [f"{len(models)} entries {why} skipped ({examples}{more})"]


def _check_header(columns: list[str], *, has_default_start: bool) -> None:
    repeated = sorted(name for name, count in Counter(columns).items() if count > 1)
    if repeated:
        raise PriceListError(f"line 1: column {repeated[0]} appears more than once")
    missing = [name for name in _CSV_REQUIRED if name not in columns]
    if missing:
        raise PriceListError(
            f"line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(the header needs {','.join(_CSV_REQUIRED)})"
        )
    if "effective_from" not in columns and not has_default_start:
        raise PriceListError(
            "line 1: no effective_from column and no default time given for the prices"
        )


def _csv_row(row: Mapping[str, str], line: int, default_start: datetime | None) -> Price:
    def where(column: str) -> str:
        return f"line {line}, column {column}"

    for column in ("provider", "model"):
        _check_name(row[column], where(column))

    def decimal(column: str) -> Decimal | None:
        text = row.get(column, "")
        if not text:
            return None
        return _exact(text, lambda reason: f"{where(column)}: {text!r}: {reason}")

    def required(column: str) -> Decimal:
        price = decimal(column)
        if price is None:
            raise PriceListError(f"{where(column)}: a price is required")
        return price

    return new_price(
        row["provider"],
        row["model"],
        _csv_start(row.get("effective_from", ""), where("effective_from"), default_start),
        input=required("input"),
        output=required("output"),
        cached_input=decimal("cached_input"),
        reasoning=decimal("reasoning"),
        request_fee_usd=decimal("request_fee_usd"),
    )


def _csv_start(text: str, where: str, default_start: datetime | None) -> datetime:
    if not text:
        if default_start is None:
            raise PriceListError(f"{where}: a time is required (no default was given)")
        return default_start
    if _RFC3339.fullmatch(text) is None:
        raise PriceListError(
            f"{where}: {text!r} must be an RFC 3339 time with an offset, like 2030-01-01T00:00:00Z"
        )
    try:
        return datetime.fromisoformat(text.upper()).astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise PriceListError(f"{where}: {text!r}: {error}") from None


def _utc(moment: datetime, name: str) -> datetime:
    if moment.utcoffset() is None:
        raise PriceListError(f"{name} must carry a UTC offset, not {moment.isoformat()}")
    return moment.astimezone(UTC)
