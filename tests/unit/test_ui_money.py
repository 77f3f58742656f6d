"""Money on the page as people read it: half up to cents, `<$0.01` for a spend under a cent,
the exact figure kept in `title` and `data-usd`."""

from __future__ import annotations

from decimal import Decimal
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_usage.api.ui_money import (
    axis_text,
    cents_text,
    count_text,
    estimated_html,
    request_usd_text,
    usd_html,
    usd_text,
)
from llm_usage.domain.money import canonical_decimal, usd_to_cents


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0", "$0.00"),
        ("0E-18", "$0.00"),
        ("0.000000000000000001", "<$0.01"),
        ("0.004", "<$0.01"),
        ("0.005", "<$0.01"),  # under a cent: never rounded up to look like a whole cent
        ("0.0099999", "<$0.01"),
        ("0.01", "$0.01"),
        ("0.014999", "$0.01"),
        ("0.015", "$0.02"),  # half up, not to even
        ("0.025", "$0.03"),
        ("1.0676952", "$1.07"),
        ("1.065", "$1.07"),
        ("1.0649999999", "$1.06"),
        ("2", "$2.00"),
        ("999.995", "$1,000.00"),
        ("1234567.891", "$1,234,567.89"),
        ("999999999999.999999999999999999", "$1,000,000,000,000.00"),
        ("-1.065", "-$1.07"),
        ("-0.004", "-<$0.01"),
    ],
)
def test_usd_text_rounds_half_up_to_cents(amount: str, shown: str) -> None:
    assert usd_text(Decimal(amount)) == shown


@given(
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal(10**12), places=18, allow_nan=False)
)
def test_usd_text_is_the_half_up_cents_of_the_exact_amount(amount: Decimal) -> None:
    cents = usd_to_cents(amount)
    assert usd_text(amount) == f"${cents // 100:,}.{cents % 100:02d}"


@pytest.mark.parametrize(
    ("cents", "shown"),
    [(0, "$0.00"), (7, "$0.07"), (107, "$1.07"), (123456, "$1,234.56"), (-250, "-$2.50")],
)
def test_cents_text(cents: int, shown: str) -> None:
    assert cents_text(cents) == shown


def test_count_text_groups_thousands() -> None:
    assert [count_text(n) for n in (0, 999, 1000, 1234567)] == ["0", "999", "1,000", "1,234,567"]


class _Span(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[str, str | None] = {}
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs = dict(attrs)

    def handle_data(self, data: str) -> None:
        self.text += data


@pytest.mark.parametrize("amount", ["1.0676952", "0.0001", "100.00", "1E+2", "0"])
def test_usd_html_keeps_the_exact_amount_a_hover_away(amount: str) -> None:
    span = _Span()
    span.feed(usd_html(Decimal(amount)))
    exact = canonical_decimal(Decimal(amount))
    assert span.attrs["data-usd"] == exact
    assert span.attrs["title"] == f"{exact} USD"
    assert span.text == usd_text(Decimal(amount))


@pytest.mark.parametrize(
    ("value", "step", "shown"),
    [
        ("0", "5", "$0"),
        ("20", "5", "$20"),
        ("10000", "2500", "$10,000"),
        ("20", "1E+1", "$20"),
        ("7.5", "2.5", "$7.50"),
        ("0.5", "0.25", "$0.50"),
        ("0.3", "0.1", "$0.30"),
        ("0.004", "0.002", "$0.004"),
        ("0.0005", "0.00025", "$0.00050"),
    ],
)
def test_axis_text_shows_the_places_its_step_needs(value: str, step: str, shown: str) -> None:
    assert axis_text(Decimal(value), Decimal(step)) == shown


def test_charges_read_as_dollars_with_tiny_amounts_exact() -> None:
    cases = {
        "0": "$0.00",
        "0.0054": "$0.0054",
        "0.5": "$0.50",
        "0.123456789": "$0.123456789",
        "1": "$1.00",
        "1.005": "$1.01",
        "1.0676952": "$1.07",
        "1234.565": "$1,234.57",
    }
    assert {text: request_usd_text(Decimal(text)) for text in cases} == cases


def test_an_estimated_part_shows_only_when_there_is_one() -> None:
    assert estimated_html(Decimal(0)) == ""
    assert estimated_html(Decimal("0.000")) == ""
    shown = estimated_html(Decimal("1.2350"))
    assert shown.startswith('<span class="estimated">of which estimated <span class="usd"')
    assert 'data-usd="1.235"' in shown
    assert ">$1.24</span>" in shown
