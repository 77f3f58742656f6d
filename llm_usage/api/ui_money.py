"""Money and counts as people read them on the page: `$1.07`, `<$0.01`, `1,234`.

The exact amount is never lost: `usd_html` shows the rounded figure and keeps the exact decimal
string (the API's spelling) in a `title` (a hover away) and in `data-usd` (for tests and tools).
Pure functions; rounding is `domain.money`'s, half up, once.
"""

from __future__ import annotations

from decimal import Decimal
from html import escape
from typing import Final

from llm_usage.domain.money import canonical_decimal, cents_to_usd, round_half_up

_CENT: Final = Decimal("0.01")
_DOLLAR: Final = Decimal(1)


def usd_text(amount: Decimal) -> str:
    """`$1,234.57` (half up to cents); `<$0.01` for an amount above zero but under a cent, so
    that a small spend never reads as nothing; negative amounts (adjustments) lead with `-`."""
    if amount < 0:
        return "-" + usd_text(-amount)
    if 0 < amount < _CENT:
        return "<$0.01"
    return f"${round_half_up(amount, 2):,f}"


def cents_text(cents: int) -> str:
    """Whole cents as dollars: 107 → `$1.07`."""
    return usd_text(cents_to_usd(cents))


def count_text(count: int) -> str:
    """A count with thousands separators: `1,234,567`."""
    return f"{count:,}"


def usd_html(amount: Decimal, *, css_class: str = "usd") -> str:
    """A `<span>` showing `usd_text(amount)`, the exact amount in `title` and `data-usd`."""
    exact = canonical_decimal(amount)
    return (
        f'<span class="{escape(css_class)}" title="{exact} USD" data-usd="{exact}">'
        f"{escape(usd_text(amount))}</span>"
    )


def estimated_html(amount: Decimal) -> str:
    """ "of which estimated $X" (the part of a charge the price table estimated), or nothing when
    none of it was: a charge the gateway sent whole reads as before."""
    if amount <= 0:
        return ""
    return f'<span class="estimated">of which estimated {usd_html(amount)}</span>'


def axis_text(value: Decimal, step: Decimal) -> str:
    """A money axis label: whole dollars when the gridlines are whole dollars apart, else as
    many places as the step needs, at least cents: `$20`, `$7.50`, `$0.002`."""
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # a finite step
    return f"${round_half_up(value, 0 if exponent >= 0 else max(2, -exponent)):,f}"


def request_usd_text(value: Decimal) -> str:
    """A charge as people read it: `$1,234.57`, rounded half up to cents from one dollar up; below
    that, the exact figure (`$0.0054`, `$0.50`), since a request's charge is often a fraction of
    a cent that rounding to cents would hide."""
    if abs(value) >= _DOLLAR:
        return f"${round_half_up(value, 2):,}"
    exact = canonical_decimal(value)
    whole, _, fraction = exact.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"
