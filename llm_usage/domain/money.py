"""Exact money arithmetic over `Decimal`: where rounding is decided, and the only place it is.

Every function works in an explicit local context, never the thread's ambient one, and that
context traps `Inexact`: arithmetic that would lose a digit raises instead of rounding quietly.
Rounding happens only where a function says so, half away from zero (`ROUND_HALF_UP`).
"""

from __future__ import annotations

from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)

# A charge has at most 12 + 18 = 30 digits; a sum of a billion of them needs 39. 60 leaves room
# for products such as usd * 100 and for callers' intermediate values, and costs nothing: libmpdec
# works on the digits a value has, not on the precision it is allowed.
MONEY_PRECISION = 60

# Arithmetic that must be exact: losing a digit raises `decimal.Inexact`.
EXACT_CONTEXT = Context(
    prec=MONEY_PRECISION,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow, Inexact],
)
# Rounding on purpose: the same, but dropping digits is the point.
_ROUNDING_CONTEXT = Context(
    prec=MONEY_PRECISION,
    rounding=ROUND_HALF_UP,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
_ONE = Decimal(1)
# Decimal's C methods parse keyword arguments slowly; hot paths pass them by position.
_QUANTUMS = {places: _ONE.scaleb(-places) for places in range(19)}


def _require_finite_decimal(value: object, name: str) -> Decimal:
    if not isinstance(value, Decimal):
        # A float here means a binary approximation already reached money: refuse it loudly.
        raise TypeError(f"{name} must be a decimal.Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"{name} must be finite, not {value}")
    return value


def round_half_up(value: Decimal, places: int = 0) -> Decimal:
    """`value` rounded to `places` digits after the point, halves away from zero (2.5 → 3).

    The result has exactly `places` digits after the point (`round_half_up(Decimal(2), 2)` is
    `Decimal("2.00")`); a negative `places` rounds to tens, hundreds, ….
    """
    value = _require_finite_decimal(value, "value")
    quantum = _QUANTUMS.get(places) or _ONE.scaleb(-places)
    return value.quantize(quantum, ROUND_HALF_UP, _ROUNDING_CONTEXT)


def usd_to_cents(usd: Decimal) -> int:
    """Whole cents for an exact USD amount: round half up of `usd * 100`, rounded once."""
    usd = _require_finite_decimal(usd, "usd")
    return int(usd.scaleb(2, EXACT_CONTEXT).quantize(_ONE, ROUND_HALF_UP, _ROUNDING_CONTEXT))


def cents_to_usd(cents: int) -> Decimal:
    """The exact USD amount of whole cents, with two digits after the point (5 → 0.05)."""
    if not isinstance(cents, int) or isinstance(cents, bool):
        raise TypeError(f"cents must be an int, not {type(cents).__name__}")
    return Decimal(cents).scaleb(-2, EXACT_CONTEXT)


def canonical_decimal(value: Decimal) -> str:
    """The one spelling of an exact amount: plain digits, no exponent, no trailing zeros
    (`100.00` and `1E+2` are both `100`), so equal limits give equal alert ids and JSON."""
    normalized = value.normalize(EXACT_CONTEXT)
    text = format(normalized, "f")
    return "0" if normalized.is_zero() else text
