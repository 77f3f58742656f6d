"""Price lists read into rows: LiteLLM's JSON and a plain CSV, exact from their digits."""

from __future__ import annotations

import json
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from llm_usage.domain.prices import new_price
from llm_usage.schemas.price_lists import (
    PriceList,
    PriceListError,
    read_csv_prices,
    read_litellm_prices,
    read_price_file,
)
from tests import clock

START = clock.now().replace(microsecond=0)

# Entries as LiteLLM's model_prices_and_context_window.json has them (BerriAI/litellm, main),
# trimmed of some capability flags: a chat model with cached input, a Claude on Bedrock with cache
# reads and writes, a Responses-API model, a free local model written with integers, a chat
# entry without prices, and entries priced per embedding token, pixel or second.
LITELLM_EXCERPT = b"""{
    "sample_spec": {
        "input_cost_per_token": 0.0,
        "litellm_provider": "one of https://docs.litellm.ai/docs/providers",
        "max_tokens": "LEGACY parameter. set to max_output_tokens if provider specifies it.",
        "mode": "one of: chat, embedding, completion, image_generation, audio_transcription",
        "output_cost_per_reasoning_token": 0.0,
        "output_cost_per_token": 0.0,
        "supports_vision": true
    },
    "1024-x-1024/dall-e-2": {
        "input_cost_per_pixel": 1.9e-08,
        "litellm_provider": "openai",
        "mode": "image_generation",
        "output_cost_per_pixel": 0.0
    },
    "embed-english-v3.0": {
        "input_cost_per_image": 0.0001,
        "input_cost_per_token": 1e-07,
        "litellm_provider": "cohere",
        "max_input_tokens": 1024,
        "max_tokens": 1024,
        "mode": "embedding",
        "output_cost_per_token": 0.0,
        "supports_embedding_image_input": true
    },
    "eu.anthropic.claude-3-5-sonnet-20241022-v2:0": {
        "input_cost_per_token": 3e-06,
        "litellm_provider": "bedrock",
        "max_input_tokens": 200000,
        "max_output_tokens": 8192,
        "max_tokens": 8192,
        "mode": "chat",
        "output_cost_per_token": 1.5e-05,
        "supports_prompt_caching": true,
        "cache_read_input_token_cost": 3e-07,
        "cache_creation_input_token_cost": 3.75e-06
    },
    "gpt-4o-2024-08-06": {
        "cache_read_input_token_cost": 1.25e-06,
        "input_cost_per_token": 2.5e-06,
        "input_cost_per_token_batches": 1.25e-06,
        "litellm_provider": "openai",
        "max_input_tokens": 128000,
        "max_output_tokens": 16384,
        "max_tokens": 16384,
        "mode": "chat",
        "output_cost_per_token": 1e-05,
        "output_cost_per_token_batches": 5e-06,
        "supports_prompt_caching": true
    },
    "gpt-5-codex": {
        "cache_read_input_token_cost": 1.25e-07,
        "input_cost_per_token": 1.25e-06,
        "litellm_provider": "openai",
        "max_input_tokens": 272000,
        "max_output_tokens": 128000,
        "max_tokens": 128000,
        "mode": "responses",
        "output_cost_per_token": 1e-05,
        "supports_reasoning": true
    },
    "groq/whisper-large-v3": {
        "input_cost_per_second": 3.083e-05,
        "litellm_provider": "groq",
        "mode": "audio_transcription",
        "output_cost_per_second": 0.0
    },
    "heroku/claude-4-sonnet": {
        "litellm_provider": "heroku",
        "max_tokens": 8192,
        "mode": "chat",
        "supports_function_calling": true
    },
    "lemonade/Gemma-3-4b-it-GGUF": {
        "input_cost_per_token": 0,
        "litellm_provider": "lemonade",
        "max_tokens": 8192,
        "mode": "chat",
        "output_cost_per_token": 0
    }
}"""


def litellm(entries: dict[str, object]) -> PriceList:
    """`entries` written as LiteLLM's JSON, numbers as the literal text given in a `Raw`."""
    text = json.dumps(entries)
    for marker, literal in RAW.items():
        text = text.replace(json.dumps(marker), literal)
    return read_litellm_prices(text.encode(), effective_from=START)


# JSON numbers written exactly as a literal (json.dumps would go through a float).
RAW: dict[str, str] = {}


def raw(literal: str) -> str:
    marker = f"@raw{len(RAW)}@"
    RAW[marker] = literal
    return marker


def chat(**fields: object) -> dict[str, object]:
    return {"litellm_provider": "openai", "mode": "chat", **fields}


def test_the_litellm_excerpt_yields_its_text_models_exactly_in_usd_per_million() -> None:
    prices = read_litellm_prices(LITELLM_EXCERPT, effective_from=START)

    assert prices.prices == [
        new_price(
            "bedrock",
            "eu.anthropic.claude-3-5-sonnet-20241022-v2:0",
            START,
            input=Decimal("3"),
            cached_input=Decimal("0.3"),
            output=Decimal("15"),
        ),
        new_price(
            "openai",
            "gpt-4o-2024-08-06",
            START,
            input=Decimal("2.5"),
            cached_input=Decimal("1.25"),
            output=Decimal("10"),
        ),
        new_price(
            "openai",
            "gpt-5-codex",
            START,
            input=Decimal("1.25"),
            cached_input=Decimal("0.125"),
            output=Decimal("10"),
        ),
        new_price(
            "lemonade", "lemonade/Gemma-3-4b-it-GGUF", START, input=Decimal(0), output=Decimal(0)
        ),
    ]
    # Spelt as plain digits, as an operator would type them: no exponent reaches the table.
    assert [str(price.output) for price in prices.prices] == ["15", "10", "10", "0"]


def test_the_litellm_excerpt_reports_what_it_skipped_and_ignored_in_a_stable_order() -> None:
    prices = read_litellm_prices(LITELLM_EXCERPT, effective_from=START)

    assert prices.ignored == [
        "1 entries without both input_cost_per_token and output_cost_per_token skipped "
        "(heroku/claude-4-sonnet)",
        "3 entries skipped whose mode is not one of chat, completion, responses: "
        "audio_transcription 1, embedding 1, image_generation 1",
        "price fields ignored (entries having them): cache_creation_input_token_cost (1), "
        "input_cost_per_token_batches (1), output_cost_per_token_batches (1)",
        "other fields ignored: max_input_tokens, max_output_tokens, max_tokens, "
        "supports_prompt_caching, supports_reasoning",
    ]
    assert read_litellm_prices(LITELLM_EXCERPT, effective_from=START) == prices


@pytest.mark.parametrize(
    ("literal", "per_million"),
    [
        ("2.5e-6", "2.5"),
        ("2.5e-06", "2.5"),
        ("2.5E-6", "2.5"),
        ("0.0000025", "2.5"),
        ("1e-05", "10"),
        ("1.25e-07", "0.125"),
        ("3.083e-05", "30.83"),
        ("5.46875e-07", "0.546875"),
        ("1.59263611e-07", "0.159263611"),
        ("1e-24", "0.000000000000000001"),
        ("3", "3000000"),
        ("0", "0"),
        ("0.0", "0"),
        ("-0.0", "0"),
        ("999999.999999999999999999", "999999999999.999999999999"),
    ],
)
def test_litellm_numbers_become_usd_per_million_exactly_from_their_digits(
    literal: str, per_million: str
) -> None:
    prices = litellm(
        {"m": chat(input_cost_per_token=raw(literal), output_cost_per_token=raw(literal))}
    )

    (price,) = prices.prices
    assert price.input == Decimal(per_million)
    assert format(price.input, "f") == per_million  # no exponent, no trailing zeros
    assert price.output == Decimal(per_million)


def test_cached_and_reasoning_prices_default_to_input_and_output_and_are_used_when_given() -> None:
    prices = litellm(
        {
            "plain": chat(input_cost_per_token=raw("1e-06"), output_cost_per_token=raw("4e-06")),
            "reasoner": chat(
                input_cost_per_token=raw("1e-06"),
                output_cost_per_token=raw("4e-06"),
                cache_read_input_token_cost=raw("2.5e-07"),
                output_cost_per_reasoning_token=raw("3.5e-06"),
                input_cost_per_request=raw("0.005"),
            ),
            "nulls": chat(
                input_cost_per_token=raw("1e-06"),
                output_cost_per_token=raw("4e-06"),
                cache_read_input_token_cost=None,
                output_cost_per_reasoning_token=None,
                input_cost_per_request=None,
            ),
        }
    )

    plain, reasoner, nulls = prices.prices
    assert (plain.cached_input, plain.reasoning) == (Decimal(1), Decimal(4))
    assert plain.request_fee_usd == 0
    assert (reasoner.cached_input, reasoner.reasoning) == (Decimal("0.25"), Decimal("3.5"))
    assert reasoner.request_fee_usd == Decimal("0.005")  # per request: not scaled
    assert nulls == plain.__class__(**{**plain.__dict__, "model": "nulls"})
    assert prices.ignored == []


def test_a_provider_prefixed_key_is_kept_whole_as_the_model_name() -> None:
    prices = litellm(
        {
            "groq/llama-3.1-8b-instant": {
                "litellm_provider": "groq",
                "input_cost_per_token": raw("5e-08"),
                "output_cost_per_token": raw("8e-08"),
            }
        }
    )

    assert [price.pair for price in prices.prices] == [("groq", "groq/llama-3.1-8b-instant")]


def test_entries_without_a_provider_or_an_object_are_skipped_and_named() -> None:
    prices = litellm(
        {
            "no-provider": {"mode": "chat", "input_cost_per_token": 1, "output_cost_per_token": 1},
            "only-input": chat(input_cost_per_token=1),
            "a-string": "not an entry",
        }
    )

    assert prices.prices == []
    assert prices.ignored == [
        "1 entries that are not JSON objects skipped (a-string)",
        "1 entries without both input_cost_per_token and output_cost_per_token skipped "
        "(only-input)",
        "1 entries without litellm_provider skipped (no-provider)",
    ]


def test_long_skip_lists_name_three_entries_in_order_and_count_the_rest() -> None:
    prices = litellm({f"m{index}": chat() for index in (4, 2, 3, 1)})

    assert prices.ignored == [
        "4 entries without both input_cost_per_token and output_cost_per_token skipped "
        "(m1, m2, m3, …)"
    ]


def test_sample_spec_is_never_read_even_with_bad_values() -> None:
    prices = litellm({"sample_spec": chat(input_cost_per_token=-1, output_cost_per_token=True)})

    assert prices == PriceList([], [])


def test_skipped_entries_are_not_checked_for_bad_values() -> None:
    prices = litellm({"images": {"mode": "image_generation", "input_cost_per_token": "free"}})

    assert prices.prices == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input_cost_per_token", raw("-2.5e-06"), "input_cost_per_token -0.0000025 (-2.5 USD"),
        (
            "output_cost_per_token",
            True,
            "output_cost_per_token must be a JSON number, not a boolean",
        ),
        (
            "output_cost_per_token",
            "1e-06",
            "output_cost_per_token must be a JSON number, not a string",
        ),
        (
            "cache_read_input_token_cost",
            [1],
            "cache_read_input_token_cost must be a JSON number, not an array",
        ),
        ("output_cost_per_reasoning_token", {}, "must be a JSON number, not an object"),
        (
            "input_cost_per_request",
            raw("-1"),
            "input_cost_per_request -1 (-1 USD): must be at least 0",
        ),
        ("input_cost_per_token", raw("1e-25"), "at most 18 digits after the decimal point"),
        ("input_cost_per_token", raw("1234567.8"), "at most 12 digits before the decimal point"),
        ("input_cost_per_token", raw("1" * 71), "has more digits than a price can keep"),
        ("input_cost_per_request", raw("0.0000000000000000001"), "at most 18 digits after"),
    ],
)
def test_bad_values_are_refused_naming_the_entry_and_field(
    field: str, value: object, message: str
) -> None:
    entry = chat(input_cost_per_token=1, output_cost_per_token=1) | {field: value}

    with pytest.raises(PriceListError, match=r"^gpt-x: ") as refused:
        litellm({"gpt-x": entry})

    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "a JSON object of model names, not an array"),
        (b"{", "not a JSON document"),
        (b'{"m": {"input_cost_per_token": NaN}}', "NaN is not a JSON number"),
        (b'{"m": {"input_cost_per_token": Infinity}}', "Infinity is not a JSON number"),
        (b'{"m": {}, "m": {}}', "'m' appears twice"),
        (
            b'{"m": {"litellm_provider": 7, '
            b'"input_cost_per_token": 1, "output_cost_per_token": 0}}',
            "m: litellm_provider must be a string, not a number",
        ),
        (
            b'{"": {"litellm_provider": "x", '
            b'"input_cost_per_token": 1, "output_cost_per_token": 0}}',
            "the model name: must be 1 to 200",
        ),
    ],
)
def test_unreadable_litellm_documents_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(PriceListError) as refused:
        read_litellm_prices(data, effective_from=START)

    assert message in str(refused.value)


def test_litellm_prices_take_effect_at_the_given_instant_in_utc() -> None:
    local = START.astimezone(timezone(timedelta(hours=-5)))

    prices = read_litellm_prices(LITELLM_EXCERPT, effective_from=local)

    assert {price.effective_from for price in prices.prices} == {START}
    assert all(price.effective_from.tzinfo is UTC for price in prices.prices)
    with pytest.raises(PriceListError, match="effective_from must carry a UTC offset"):
        read_litellm_prices(LITELLM_EXCERPT, effective_from=START.replace(tzinfo=None))


def test_a_csv_reads_every_column_exactly_and_lists_unknown_ones() -> None:
    later = START + timedelta(days=1)
    text = (
        "provider,model,input,output,cached_input,reasoning,request_fee_usd,effective_from,note\n"
        f"openai,gpt-4o,2.50,10,1.25,,,{clock.iso(START)},list price\n"
        f"openai,o1,15,60,7.5,60.000000000000000001,0.01,{clock.iso(later)},\n"
        "\n"
    )

    prices = read_csv_prices(text)

    assert prices.prices == [
        new_price(
            "openai",
            "gpt-4o",
            START,
            input=Decimal("2.5"),
            cached_input=Decimal("1.25"),
            output=Decimal(10),
        ),
        new_price(
            "openai",
            "o1",
            later,
            input=Decimal(15),
            output=Decimal(60),
            cached_input=Decimal("7.5"),
            reasoning=Decimal("60.000000000000000001"),
            request_fee_usd=Decimal("0.01"),
        ),
    ]
    assert prices.ignored == ["columns ignored: note"]


def test_a_csv_without_effective_from_takes_the_default_in_utc_and_a_cell_overrides_it() -> None:
    later = START + timedelta(hours=1)
    text = f" model , provider,output,input,effective_from\nm,p,1,2,\nn,p,1,2,{clock.iso(later)}\n"

    prices = read_csv_prices(text, effective_from=START.astimezone(timezone(timedelta(hours=9))))

    assert [(price.model, price.effective_from) for price in prices.prices] == [
        ("m", START),
        ("n", later),
    ]
    assert read_csv_prices(
        "provider,model,input,output\np,m,1,2\n", effective_from=START
    ).prices == [new_price("p", "m", START, input=Decimal(1), output=Decimal(2))]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "line 1: the CSV is empty"),
        ("provider,model,input\np,m,1\n", "line 1: missing column output"),
        ("model,input\n", "line 1: missing columns provider, output"),
        ("provider,model,input,output,input\n", "line 1: column input appears more than once"),
        ("provider,model,input,output\np,m,1,2\n", "line 1: no effective_from column"),
        (
            "provider,model,input,output,effective_from\np,m,1,2\n",
            "line 2: 4 cells where the header has 5",
        ),
        (
            "provider,model,input,output,effective_from\n\np,m,,2,{start}\n",
            "line 3, column input: a price is required",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,-2,{start}\n",
            "line 2, column output: '-2': must be at least 0",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,2.5e-19,{start}\n",
            "line 2, column output: '2.5e-19': at most 18 digits",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,1e12,{start}\n",
            "column output: '1e12': at most 12 digits before",
        ),
        (
            "provider,model,input,output,effective_from\np,m,$1,2,{start}\n",
            "line 2, column input: '$1': must be a number written in digits",
        ),
        (
            "provider,model,input,output,effective_from\np,m,NaN,2,{start}\n",
            "column input: 'NaN': must be a number",
        ),
        (
            "provider,model,input,output,cached_input,effective_from\np,m,1,2,0x1,{start}\n",
            "line 2, column cached_input",
        ),
        (
            "provider,model,input,output,effective_from\np,,1,2,{start}\n",
            "line 2, column model: must be 1 to 200",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,2,\n",
            "line 2, column effective_from: a time is required",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,2,2030-01-01T00:00:00\n",
            "must be an RFC 3339 time with an offset",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,2,2030-02-30T00:00:00Z\n",
            "line 2, column effective_from: '2030-02-30T00:00:00Z':",
        ),
        (
            "provider,model,input,output,effective_from\np,m,1,2,{start}\np,m,3,4,{start}\n",
            "line 3: p/m from",
        ),
    ],
)
def test_bad_csv_lines_are_refused_naming_the_line_and_column(text: str, message: str) -> None:
    with pytest.raises(PriceListError) as refused:
        read_csv_prices(text.format(start=clock.iso(START)))

    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_price_files_are_read_by_their_suffix(tmp_path: Path) -> None:
    (tmp_path / "prices.JSON").write_bytes(LITELLM_EXCERPT)
    (tmp_path / "prices.csv").write_bytes("\ufeffprovider,model,input,output\np,m,1,2\n".encode())

    from_json = read_price_file(tmp_path / "prices.JSON", effective_from=START)
    from_csv = read_price_file(tmp_path / "prices.csv", effective_from=START)

    assert from_json == read_litellm_prices(LITELLM_EXCERPT, effective_from=START)
    assert from_csv.prices == [new_price("p", "m", START, input=Decimal(1), output=Decimal(2))]


@pytest.mark.parametrize(
    ("name", "content", "effective_from", "message"),
    [
        ("prices.yaml", b"", START, "cannot tell the format from '.yaml'; use .json"),
        ("prices", b"", START, "cannot tell the format from 'no suffix'"),
        ("prices.json", LITELLM_EXCERPT, None, "a LiteLLM price list carries no dates"),
        ("prices.csv", b"provider,model\n\xff", None, "not UTF-8 text"),
    ],
)
def test_price_files_of_unknown_format_or_without_a_date_are_refused(
    tmp_path: Path, name: str, content: bytes, effective_from: object, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(PriceListError, match=message):
        read_price_file(path, effective_from=effective_from)  # type: ignore[arg-type]
