"""A budget policy and the status of its limits: pure values and rules, no I/O.

What `policy set` (and the HTTP API) accept is decided here: the policy's ids, its exact limits,
its warn percentage and its enforcement (limits that only alert, or also block budget checks).
So is what `budget status` shows for a spend counter against a limit: the percent and the level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeAlias

from llm_usage.domain.budgets import BudgetWindow, Enforcement, ScopeType
from llm_usage.domain.ids import is_clean_id
from llm_usage.domain.money import canonical_decimal

DEFAULT_WARN_THRESHOLD_PCT: Final = 80
MIN_WARN_THRESHOLD_PCT: Final = 1
MAX_WARN_THRESHOLD_PCT: Final = 99
MAX_ID_LENGTH: Final = 200
MAX_WHOLE_DIGITS: Final = 12
MAX_FRACTION_DIGITS: Final = 18

# (tenant_id, scope_type, scope_id): the primary key of a policy and of its spend counters.
PolicyKey: TypeAlias = tuple[str, str, str]

# A number as people and JSON write it: an optional sign, digits with an optional point, an
# optional exponent. No spaces, `_`, NaN or Infinity, all of which `Decimal()` would accept.
_DECIMAL_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_WHOLE_NUMBER_TEXT = re.compile(r"[+-]?[0-9]+")
# The contract's tenant id: no control characters, no leading or trailing whitespace.


class InvalidPolicyError(ValueError):
    """A policy breaks a rule. `field` names the policy field at fault (None: the policy as a
    whole); `problem` reads after the field's name, e.g. "must be more than 0"."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"{field} {problem}" if field else problem)
        self.field = field
        self.problem = problem


def check_tenant_id(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidPolicyError("tenant_id", f"must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidPolicyError("tenant_id", f"must be 1 to {MAX_ID_LENGTH} characters")
    if not is_clean_id(value):
        raise InvalidPolicyError(
            "tenant_id", "must have no leading or trailing whitespace and no control characters"
        )
    return value


def _check_scope_id(value: object) -> str:
    # The rule of the events' attribution fields, so that a policy can name any of them.
    if not isinstance(value, str):
        raise InvalidPolicyError("scope_id", f"must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidPolicyError("scope_id", f"must be 1 to {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise InvalidPolicyError("scope_id", "must not contain a NUL character")
    return value


def _check_limit(field: str, value: object) -> Decimal | None:
    if value is None:
        return None
    if not isinstance(value, Decimal):
        # A float here means a binary approximation already reached money.
        raise InvalidPolicyError(field, f"must be an exact decimal, not {type(value).__name__}")
    _sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN, sNaN or Infinity
        raise InvalidPolicyError(field, "must be a finite number")
    if value <= 0:
        raise InvalidPolicyError(field, f"must be more than 0, not {value}")
    # Digits are counted as written: that is the scale PostgreSQL is asked to keep.
    if -exponent > MAX_FRACTION_DIGITS:
        raise InvalidPolicyError(
            field, f"has at most {MAX_FRACTION_DIGITS} digits after the decimal point"
        )
    if len(digits) + exponent > MAX_WHOLE_DIGITS:
        raise InvalidPolicyError(
            field, f"has at most {MAX_WHOLE_DIGITS} digits before the decimal point"
        )
    return value


def _check_warn_pct(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPolicyError(
            "warn_threshold_pct", f"must be a whole number, not {type(value).__name__}"
        )
    if not MIN_WARN_THRESHOLD_PCT <= value <= MAX_WARN_THRESHOLD_PCT:
        raise InvalidPolicyError(
            "warn_threshold_pct",
            f"must be from {MIN_WARN_THRESHOLD_PCT} to {MAX_WARN_THRESHOLD_PCT}, not {value}",
        )
    return value


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """One scope's policy, valid by construction (an invalid one raises InvalidPolicyError).

    Limits are exact and compared by value: `Decimal("100.0")` and `Decimal("100")` are the same
    limit, so two policies that differ only in how a limit is spelled are equal.
    """

    tenant_id: str
    scope_type: ScopeType
    scope_id: str
    daily_limit_usd: Decimal | None = None
    monthly_limit_usd: Decimal | None = None
    warn_threshold_pct: int = DEFAULT_WARN_THRESHOLD_PCT
    enforcement: Enforcement = Enforcement.ALERT

    def __post_init__(self) -> None:
        check_tenant_id(self.tenant_id)
        try:
            scope_type = ScopeType(self.scope_type)
        except ValueError:
            raise InvalidPolicyError(
                "scope_type", f"must be one of {_SCOPE_NAMES}, not {self.scope_type!r}"
            ) from None
        object.__setattr__(self, "scope_type", scope_type)
        _check_scope_id(self.scope_id)
        if scope_type is ScopeType.TENANT and self.scope_id != self.tenant_id:
            raise InvalidPolicyError(
                "scope_id",
                f"of a tenant policy is the tenant id ({self.tenant_id!r}), not {self.scope_id!r}",
            )
        _check_limit("daily_limit_usd", self.daily_limit_usd)
        _check_limit("monthly_limit_usd", self.monthly_limit_usd)
        if self.daily_limit_usd is None and self.monthly_limit_usd is None:
            raise InvalidPolicyError(None, "a policy needs a daily limit, a monthly limit or both")
        _check_warn_pct(self.warn_threshold_pct)
        object.__setattr__(self, "enforcement", parse_enforcement(self.enforcement))

    @property
    def key(self) -> PolicyKey:
        return (self.tenant_id, self.scope_type.value, self.scope_id)

    def limit_for(self, window: BudgetWindow) -> Decimal | None:
        """The limit of `window`, or None when the policy sets none for it."""
        if window is BudgetWindow.DAILY:
            return self.daily_limit_usd
        return self.monthly_limit_usd

    def limits(self) -> list[tuple[BudgetWindow, Decimal]]:
        """The windows this policy limits and their limits, daily first."""
        return [
            (window, limit)
            for window in BudgetWindow
            if (limit := self.limit_for(window)) is not None
        ]

    def to_json(self) -> dict[str, Any]:
        """The policy as a JSON object; limits as exact decimal strings (or null)."""
        return {
            "tenant_id": self.tenant_id,
            "scope_type": self.scope_type.value,
            "scope_id": self.scope_id,
            "daily_limit_usd": _amount_or_none(self.daily_limit_usd),
            "monthly_limit_usd": _amount_or_none(self.monthly_limit_usd),
            "warn_threshold_pct": self.warn_threshold_pct,
            "enforcement": self.enforcement.value,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BudgetPolicy:
        """The inverse of `to_json`; limits must be decimal strings (or null). Audit entries
        written before enforcement existed have none: those policies only alerted."""
        return cls(
            tenant_id=data["tenant_id"],
            scope_type=data["scope_type"],
            scope_id=data["scope_id"],
            daily_limit_usd=_json_amount("daily_limit_usd", data.get("daily_limit_usd")),
            monthly_limit_usd=_json_amount("monthly_limit_usd", data.get("monthly_limit_usd")),
            warn_threshold_pct=data.get("warn_threshold_pct", DEFAULT_WARN_THRESHOLD_PCT),
            enforcement=data.get("enforcement", Enforcement.ALERT),
        )


_SCOPE_NAMES = ", ".join(scope.value for scope in ScopeType)
_ENFORCEMENT_NAMES = ", ".join(each.value for each in Enforcement)


def _amount_or_none(value: Decimal | None) -> str | None:
    return None if value is None else canonical_decimal(value)


def _json_amount(field: str, value: object) -> Decimal | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidPolicyError(field, f"must be a decimal string, not {type(value).__name__}")
    return parse_limit_usd(field, value)


def parse_limit_usd(field: str, text: str) -> Decimal:
    """An exact limit from its text (never through a float): more than 0, at most 12 digits
    before the point and 18 after."""
    if _DECIMAL_TEXT.fullmatch(text) is None:
        raise InvalidPolicyError(field, f"must be a number in USD like 100 or 12.50, not {text!r}")
    limit = _check_limit(field, Decimal(text))
    assert limit is not None  # a Decimal went in
    return limit


def parse_warn_pct(text: str) -> int:
    """The warn percentage from its text: a whole number from 1 to 99."""
    if _WHOLE_NUMBER_TEXT.fullmatch(text) is None:
        raise InvalidPolicyError(
            "warn_threshold_pct",
            f"must be a whole number from {MIN_WARN_THRESHOLD_PCT} to {MAX_WARN_THRESHOLD_PCT}, "
            f"not {text!r}",
        )
    return _check_warn_pct(int(text))


def parse_enforcement(value: object) -> Enforcement:
    """`alert` or `block` (its text or the enum itself)."""
    if not isinstance(value, str):  # an Enforcement is a str too
        raise InvalidPolicyError("enforcement", f"must be a string, not {type(value).__name__}")
    try:
        return Enforcement(value)
    except ValueError:
        raise InvalidPolicyError(
            "enforcement", f"must be one of {_ENFORCEMENT_NAMES}, not {value!r}"
        ) from None


def parse_scope_type(text: str) -> ScopeType:
    try:
        return ScopeType(text)
    except ValueError:
        raise InvalidPolicyError(
            "scope_type", f"must be one of {_SCOPE_NAMES}, not {text!r}"
        ) from None


def scope_id_for(tenant_id: str, scope_type: ScopeType, scope_id: str | None) -> str:
    """The scope id a command means: for `tenant` the tenant id (an explicit one must equal it),
    for any other scope the one given, which is then required."""
    if scope_type is ScopeType.TENANT:
        if scope_id is not None and scope_id != tenant_id:
            raise InvalidPolicyError(
                "scope_id",
                f"of a tenant policy is the tenant id ({tenant_id!r}), not {scope_id!r}; "
                "leave it out",
            )
        return tenant_id
    if scope_id is None:
        raise InvalidPolicyError("scope_id", f"is required when the scope is {scope_type.value}")
    return _check_scope_id(scope_id)


def policy_from_text(
    *,
    tenant_id: str,
    scope_type: str,
    scope_id: str | None,
    daily_limit_usd: str | None,
    monthly_limit_usd: str | None,
    warn_threshold_pct: str | None,
    enforcement: str | None = None,
) -> BudgetPolicy:
    """A policy from the text a person typed; omitted limits are absent (no limit)."""
    check_tenant_id(tenant_id)
    scope = parse_scope_type(scope_type)
    return BudgetPolicy(
        tenant_id=tenant_id,
        scope_type=scope,
        scope_id=scope_id_for(tenant_id, scope, scope_id),
        daily_limit_usd=(
            None if daily_limit_usd is None else parse_limit_usd("daily_limit_usd", daily_limit_usd)
        ),
        monthly_limit_usd=(
            None
            if monthly_limit_usd is None
            else parse_limit_usd("monthly_limit_usd", monthly_limit_usd)
        ),
        warn_threshold_pct=(
            DEFAULT_WARN_THRESHOLD_PCT
            if warn_threshold_pct is None
            else parse_warn_pct(warn_threshold_pct)
        ),
        enforcement=Enforcement.ALERT if enforcement is None else parse_enforcement(enforcement),
    )
