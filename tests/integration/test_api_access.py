"""Every route of the OpenAPI document, with every role, a foreign tenant's token and each kind
of bad token: 401 before 403 before 422, never another tenant's data, never a 500.

A route added later must be added to ROUTES below, with the least role it needs, or this test
fails; so does a route served outside the document that is not one of the public probes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import jwt
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from llm_usage.api.app import create_app
from llm_usage.api.openapi import openapi_document
from tests import clock
from tests.api_support import AUDIENCE, SECRET, api_client, bearer, token, unsigned_token
from tests.integration.pipeline import unique

MEMBER, ADMIN, PLATFORM = "tenant-member", "tenant-admin", "platform-admin"
GATEWAY = "gateway"
RANK = {GATEWAY: 0, MEMBER: 1, ADMIN: 2, PLATFORM: 3}
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
# From then to now (`to`'s default) is longer than a range may be.
TEN_YEARS_AGO = (clock.today() - timedelta(days=3653)).isoformat()
# The last day of last month and the day after it: a range that has ended, whatever today is.
_DAY = clock.this_month() - timedelta(days=1)
_NEXT_DAY = _DAY + timedelta(days=1)


@dataclass(frozen=True)
class Malformed:
    """A request whose one fault is the parameter at `loc`."""

    loc: list[str | int]
    query: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    tenant: str | None = None  # a path tenant id of its own (only a platform admin gets past 403)


@dataclass(frozen=True)
class Route:
    least_role: str  # GATEWAY: exactly the gateway and platform admins, not by rank
    ok_status: int
    query: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    malformed: tuple[Malformed, ...] = ()


_BAD_TENANT = Malformed(["path", "tenant_id"], tenant=" padded")
# A pair of this run's own, its first row backdated (a first row may start at any time).
_PRICE_ROW = {
    "provider": unique("provider"),
    "model": "m",
    "effective_from": f"{_DAY}T00:00:00Z",
    "input": "2.5",
    "output": "10",
}
_CHECK = {"gateway_request_id": unique("req"), "tenant_id": unique("tenant")}
_CHARGE_CHECK = {**_CHECK, "estimated_charge_usd": "0.25"}
_TOKENS_CHECK = {
    **_CHECK,
    "provider": unique("provider"),  # no price: the tokens cannot be priced
    "model": "m",
    "estimated_input_tokens": 10,
    "estimated_output_tokens": 10,
}
ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/v1/tenants/{tenant_id}/usage/summary"): Route(
        MEMBER,
        200,
        {"from": f"{_DAY}", "to": f"{_NEXT_DAY}T00:00:00Z"},
        malformed=(
            Malformed(["query", "from"], {"from": "yesterday"}),
            Malformed(["query", "from"], {"from": TEN_YEARS_AGO, "to": f"{_DAY}"}),
            Malformed(["query", "to"], {"from": f"{_NEXT_DAY}", "to": f"{_DAY}"}),
            Malformed(["query", "to"], {"to": f"{_DAY}T00:00:00"}),
            _BAD_TENANT,
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/usage/breakdown"): Route(
        MEMBER,
        200,
        {"by": "model"},
        malformed=(
            Malformed(["query", "by"], {"by": "colour"}),
            Malformed(["query", "by"], {}),
            Malformed(["query", "limit"], {"by": "user", "limit": str(10**9)}),
            Malformed(["query", "limit"], {"by": "user", "limit": "0"}),
            Malformed(["query", "from"], {"by": "user", "from": TEN_YEARS_AGO}),
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/usage/daily"): Route(
        MEMBER,
        200,
        {"days": "7"},
        malformed=(
            Malformed(["query", "days"], {"days": "0"}),
            Malformed(["query", "days"], {"days": "3650"}),
            Malformed(["query", "days"], {"days": "seven"}),
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/usage/events"): Route(
        MEMBER,
        200,
        {"from": f"{_DAY}", "to": f"{_NEXT_DAY}", "user_id": "u-1", "limit": "5"},
        malformed=(
            Malformed(["query", "cursor"], {"cursor": "not-a-cursor"}),
            Malformed(["query", "limit"], {"limit": "1001"}),
            Malformed(["query", "limit"], {"limit": "0"}),
            Malformed(["query", "from"], {"from": "yesterday"}),
            _BAD_TENANT,
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/budgets"): Route(
        MEMBER, 200, malformed=(Malformed(["path", "tenant_id"], tenant="x" * 201),)
    ),
    ("GET", "/v1/tenants/{tenant_id}/alerts"): Route(
        MEMBER,
        200,
        {"since": f"{_DAY}"},
        malformed=(
            Malformed(["query", "since"], {"since": "last week"}),
            Malformed(["query", "limit"], {"limit": "-1"}),
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/budget-policies"): Route(
        MEMBER, 200, malformed=(_BAD_TENANT,)
    ),
    ("GET", "/v1/tenants/{tenant_id}/budget-policies/history"): Route(
        ADMIN, 200, malformed=(_BAD_TENANT,)
    ),
    ("PUT", "/v1/tenants/{tenant_id}/budget-policies"): Route(
        ADMIN,
        200,
        body=json.dumps({"scope_type": "tenant", "monthly_limit_usd": "100"}).encode(),
        malformed=(
            Malformed(
                ["body", "daily_limit_usd"],
                body=json.dumps(
                    {"scope_type": "deployment", "scope_id": "d", "daily_limit_usd": "-1"}
                ).encode(),
            ),
            Malformed(
                ["body", "daily_limit_usd"],
                body=json.dumps({"scope_type": "tenant", "daily_limit_usd": 100}).encode(),
            ),
            Malformed(
                ["body", "scope_id"],
                body=json.dumps({"scope_type": "user", "daily_limit_usd": "1"}).encode(),
            ),
            Malformed(
                ["body", "warn_threshold_pct"],
                body=json.dumps(
                    {"scope_type": "tenant", "daily_limit_usd": "1", "warn_threshold_pct": 100}
                ).encode(),
            ),
            Malformed(["body"], body=json.dumps({"scope_type": "tenant"}).encode()),
            Malformed(["body"], body=b"{not json"),
            Malformed(["body", "colour"], body=b'{"scope_type": "tenant", "colour": "red"}'),
        ),
    ),
    ("DELETE", "/v1/tenants/{tenant_id}/budget-policies"): Route(
        ADMIN,
        404,  # past every guard and check: this tenant has no such policy
        {"scope_type": "deployment", "scope_id": "nowhere"},
        malformed=(
            Malformed(["query", "scope_type"], {"scope_type": "planet"}),
            Malformed(["query", "scope_id"], {"scope_type": "agent"}),
        ),
    ),
    ("GET", "/v1/tenants/{tenant_id}/invoice-lines"): Route(
        ADMIN,
        200,
        {"period": f"{_DAY:%Y-%m}"},
        malformed=(
            Malformed(["query", "period"], {"period": "2026-13"}),
            Malformed(["query", "period"], {}),
        ),
    ),
    ("GET", "/ui/tenants/{tenant_id}"): Route(MEMBER, 200, malformed=(_BAD_TENANT,)),
    ("GET", "/ui/tenants/{tenant_id}/events"): Route(
        MEMBER,
        200,
        {"user_id": "u-1", "from": f"{_DAY}", "to": f"{_NEXT_DAY}"},
        malformed=(
            Malformed(["query", "cursor"], {"cursor": "e30"}),
            Malformed(["query", "before"], {"before": "!"}),
            Malformed(["query", "to"], {"to": "soon"}),
            _BAD_TENANT,
        ),
    ),
    ("GET", "/v1/prices"): Route(
        MEMBER,
        200,
        {"provider": "nobody", "at": f"{_DAY}"},
        malformed=(Malformed(["query", "at"], {"at": "last week"}),),
    ),
    ("PUT", "/v1/prices"): Route(
        PLATFORM,
        200,  # the first time added, then unchanged: the same row again changes nothing
        body=json.dumps(_PRICE_ROW).encode(),
        malformed=(
            Malformed(["body", "input"], body=json.dumps({**_PRICE_ROW, "input": 2.5}).encode()),
            Malformed(
                ["body", 0, "output"], body=json.dumps([{**_PRICE_ROW, "output": "-1"}]).encode()
            ),
            Malformed(
                ["body", "effective_from"],
                body=json.dumps({**_PRICE_ROW, "effective_from": f"{_DAY}"}).encode(),
            ),
            Malformed(["body", "model"], body=json.dumps({**_PRICE_ROW, "model": ""}).encode()),
            Malformed(["body"], body=b"[]"),
            Malformed(["body"], body=b"{not json"),
        ),
    ),
    ("POST", "/v1/budget-checks"): Route(
        GATEWAY,
        200,  # allowed (the tenant has no policy), then the same answer repeated
        body=json.dumps(_CHARGE_CHECK).encode(),
        malformed=(
            Malformed(["body"], body=b"{not json"),
            Malformed(["body"], body=json.dumps({**_TOKENS_CHECK, **_CHARGE_CHECK}).encode()),
            Malformed(["body"], body=json.dumps(_CHECK).encode()),
            Malformed(["body", "provider"], body=json.dumps(_TOKENS_CHECK).encode()),
            Malformed(
                ["body", "estimated_charge_usd"],
                body=json.dumps({**_CHECK, "estimated_charge_usd": "-1"}).encode(),
            ),
            Malformed(
                ["body", "gateway_request_id"],
                body=json.dumps({**_CHARGE_CHECK, "gateway_request_id": " x"}).encode(),
            ),
        ),
    ),
    ("POST", "/v1/usage-events"): Route(
        GATEWAY,
        200,
        body=b"[]",
        malformed=(
            Malformed(["body"], body=b"[{"),
            Malformed(["body"], body=json.dumps([{}] * 1001).encode()),
        ),
    ),
}


def _bad_tokens(tenant: str) -> dict[str, dict[str, str]]:
    """Authorization headers that must each get a 401, whatever else the request says."""
    now = int(time.time())
    valid_claims = {"aud": AUDIENCE, "exp": now + 300, "sub": "mallory", "role": PLATFORM}
    return {
        "no header": {},
        "not a bearer": {"Authorization": f"Basic {SECRET}"},
        "not a JWT": bearer("garbage"),
        "empty bearer": {"Authorization": "Bearer "},
        "bad signature": bearer(token(PLATFORM, key="another-secret-of-at-least-32-bytes!!")),
        "expired": bearer(token(PLATFORM, expires_in=-60)),
        "wrong audience": bearer(token(PLATFORM, aud="another-service")),
        "no audience": bearer(token(PLATFORM, aud=None)),
        "alg none": bearer(unsigned_token(valid_claims)),
        "alg none, tenant role": bearer(
            unsigned_token({**valid_claims, "role": MEMBER, "tenant_id": tenant})
        ),
        "HS512 with the secret": bearer(token(PLATFORM, algorithm="HS512")),
        "no exp": bearer(
            jwt.encode({k: v for k, v in valid_claims.items() if k != "exp"}, SECRET, "HS256")
        ),
        "no sub": bearer(token(PLATFORM, sub=None)),
        "unknown role": bearer(token("superuser", tenant)),
        "no role": bearer(token(None, tenant)),
        "tenant admin without tenant_id": bearer(token(ADMIN)),
        "tenant member with an empty tenant_id": bearer(token(MEMBER, "")),
        "tenant_id not a string": bearer(token(MEMBER, 7)),
    }


def _allowed(role: str, route: Route) -> bool:
    if route.least_role == GATEWAY:
        return role in (GATEWAY, PLATFORM)
    return RANK[role] >= RANK[route.least_role]


def _url(path: str, tenant: str) -> str:
    return path.replace("{tenant_id}", quote(tenant, safe=""))


Call = Callable[..., Any]


async def _call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    tenant: str,
    headers: dict[str, str],
    query: dict[str, str],
    body: bytes | None,
) -> httpx.Response:
    return await client.request(
        method,
        _url(path, tenant),
        params=query,
        content=body,
        headers={**headers, "Content-Type": "application/json"},
    )


def test_every_served_route_is_in_the_document_or_a_public_probe() -> None:
    # The app holds each included router as one node; its routes are reached through it.
    served = {
        (method, route.path)
        for route in iter_route_contexts(create_app(None).routes)
        if isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
    }
    assert served - documented == {("GET", path) for path in PUBLIC - {"/openapi.json"}}
    assert documented - EVENT_ROUTES == set(ROUTES), "every documented route needs a row in ROUTES"


# Routes about one event, whose tenant is the event's, not a path's: a member reads its own
# tenant's events only, a platform admin names the tenant past the id window. This table's
# path-tenant rules do not fit them; tests/integration/test_api_corrections.py checks every
# role, the 401s and the 422s of both.
EVENT_ROUTES = {
    ("GET", "/v1/usage-events/{gateway_request_id}"),
    ("POST", "/v1/usage-events/{gateway_request_id}/corrections"),
}


async def test_every_route_answers_each_caller_as_the_contract_says(pool: asyncpg.Pool) -> None:
    tenant, foreign = unique("tenant"), unique("tenant")
    roles = [
        (MEMBER, bearer(token(MEMBER, tenant))),
        (ADMIN, bearer(token(ADMIN, tenant))),
        (PLATFORM, bearer(token(PLATFORM))),
        (GATEWAY, bearer(token(GATEWAY))),
        # A gateway acts for any tenant: a tenant_id on its token gives it no tenant's data.
        (GATEWAY, bearer(token(GATEWAY, tenant))),
    ]
    foreign_tokens = {
        "foreign member": bearer(token(MEMBER, foreign)),
        "foreign admin": bearer(token(ADMIN, foreign)),
    }
    bad_tokens = _bad_tokens(tenant)
    checked = 0
    async with api_client(pool) as (client, _):
        for (method, path), route in ROUTES.items():
            tenant_scoped = "{tenant_id}" in path
            requests = [(route.query, route.body, tenant)] + [
                (bad.query, bad.body, bad.tenant or tenant) for bad in route.malformed
            ]
            for name, headers in bad_tokens.items():
                for query, body, path_tenant in requests:
                    answer = await _call(
                        client, method, path, tenant=path_tenant, headers=headers,
                        query=query, body=body,
                    )  # fmt: skip
                    assert answer.status_code == 401, (method, path, name, query, answer.text)
                    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
                    checked += 1
            # A route about no tenant's data that tenant roles may call (the price table):
            # another tenant's token is as good as the path tenant's.
            shared = not tenant_scoped and route.least_role not in (PLATFORM, GATEWAY)
            for name, headers in foreign_tokens.items():
                for index, (query, body, path_tenant) in enumerate(requests):
                    answer = await _call(
                        client, method, path, tenant=path_tenant, headers=headers,
                        query=query, body=body,
                    )  # fmt: skip
                    expected = (route.ok_status if index == 0 else 422) if shared else 403
                    assert answer.status_code == expected, (method, path, name, query, answer.text)
                    checked += 1
            for role, headers in roles:
                allowed = _allowed(role, route)
                answer = await _call(
                    client, method, path, tenant=tenant, headers=headers,
                    query=route.query, body=route.body,
                )  # fmt: skip
                expected = route.ok_status if allowed else 403
                assert answer.status_code == expected, (method, path, role, answer.text)
                checked += 1
                for bad in route.malformed:
                    answer = await _call(
                        client, method, path, tenant=bad.tenant or tenant, headers=headers,
                        query=bad.query, body=bad.body,
                    )  # fmt: skip
                    # A tenant role on a path tenant that is not its own: 403 before 422.
                    foreign_path = bad.tenant is not None and role != PLATFORM and tenant_scoped
                    if not allowed or foreign_path:
                        assert answer.status_code == 403, (method, path, role, bad, answer.text)
                    else:
                        assert answer.status_code == 422, (method, path, role, bad, answer.text)
                        locations = [error["loc"] for error in answer.json()["detail"]]
                        assert bad.loc in locations, (method, path, bad, answer.text)
                    checked += 1
    assert checked > 700


async def test_public_probes_and_the_document_need_no_token(pool: asyncpg.Pool) -> None:
    async with api_client(pool) as (client, _):
        for path in sorted(PUBLIC):
            answer = await client.get(path)
            assert answer.status_code == 200, (path, answer.text)
        assert (await client.get("/openapi.json")).json() == openapi_document()
        assert (
            await client.get("/v2/anything", headers=bearer(token(PLATFORM)))
        ).status_code == 404


@pytest.mark.parametrize("role", [MEMBER, ADMIN])
async def test_a_tenant_token_never_reads_another_tenants_usage(
    pool: asyncpg.Pool, role: str
) -> None:
    tenant, other = unique("tenant"), unique("tenant")
    async with api_client(pool) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{other}/usage/summary", headers=bearer(token(role, tenant))
        )
        assert answer.status_code == 403
        assert other not in answer.text
        assert answer.json() == {"detail": "this token does not give access to this tenant"}
