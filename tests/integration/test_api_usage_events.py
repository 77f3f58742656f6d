"""The events drill-down (`GET …/usage/events` and its page) and the policy history route.

Events go through the usage consumer's own recorder; what the API answers is compared with the
rows of `llm_usage_events` read here, ordered and filtered in Python.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi.exceptions import RequestValidationError

from llm_usage.api.event_cursors import encode_cursor, event_query
from llm_usage.consumers.usage.recorder import UsageRecorder
from llm_usage.domain.corrections import CORRIGIBLE_FIELDS
from llm_usage.domain.money import canonical_decimal
from llm_usage.storage.usage_event_pages import EventPageRequest, EventPosition, page_statement
from tests.api_support import api_client, bearer, token
from tests.integration.pipeline import encode, unique, usage_event
from tests.integration.test_api_reports import NOW, PRICED, add_report_price
from tests.records import consumer_record

MONTH_START = NOW.replace(day=1, hour=0)
# A few instants, each shared by several events: pages must cut through ties.
INSTANTS = [NOW - timedelta(days=day, seconds=second) for day in (0, 3, 30) for second in (0, 7)]


def _events(tenant: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    events = []
    for number in range(count):
        event = usage_event(
            tenant,
            gateway_request_id=f"{unique('req')}-{rng.randrange(10**6):06d}-{number}",
            occurred_at=rng.choice(INSTANTS).isoformat().replace("+00:00", "Z"),
            customer_charge_usd=rng.choice(["0.0054", "0.50", "1.005", "0", "12.3456789"]),
            upstream_cost_usd=rng.choice([None, "0.0031"]),
            cached_input_tokens=rng.randrange(100),
            request_kind=rng.choice([None, "chat"]),
            channel=rng.choice([None, "web"]),
        )
        for field in ("user_id", "agent_id", "deployment_id", "model"):
            event[field] = rng.choice([None, f"{field}-a", f"{field}-b"])
        if rng.random() < 0.2:  # no charge sent: the price table estimates it
            del event["customer_charge_usd"], event["customer_charge_cents"]
            event["provider"], event["model"] = PRICED
        events.append(event)
    return events


async def _store(pool: asyncpg.Pool, events: Sequence[dict[str, Any]]) -> None:
    await add_report_price(pool)
    records = [consumer_record(encode(e), offset=n) for n, e in enumerate(events)]
    for start in range(0, len(records), 500):
        await UsageRecorder(pool=pool, clock=lambda: NOW).record_batch(records[start : start + 500])


def _newest_first(rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    return sorted(rows, key=lambda r: (r["occurred_at"], r["gateway_request_id"]), reverse=True)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _as_answered(row: asyncpg.Record) -> dict[str, Any]:
    """A stored row as the API must answer it: every column, money exact, times in UTC."""
    answer: dict[str, Any] = dict(row)
    for name in ("customer_charge_usd", "upstream_cost_usd"):
        if answer[name] is not None:
            answer[name] = canonical_decimal(answer[name])
    for name in ("occurred_at", "received_at", "price_effective_from"):
        if answer[name] is not None:
            answer[name] = _utc(answer[name])
    # Never corrected: what it counts for is what was stored.
    effective = {name: answer[name] for name in (*CORRIGIBLE_FIELDS, "charge_estimated")}
    answer["effective"] = {**effective, "voided": False}
    answer["corrected"] = False
    return answer


async def _walk(
    client: httpx.AsyncClient, tenant: str, headers: dict[str, str], query: dict[str, str]
) -> tuple[list[dict[str, Any]], int]:
    """Every page from the newest on: the items in order, and how many pages it took."""
    items, pages, cursor = [], 0, None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/events", params=params, headers=headers
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == {"items", "next_cursor"}
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert len(body["items"]) == int(query.get("limit", "100"))


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> str:
    tenant, neighbour = unique("tenant"), unique("tenant")
    rng = random.Random(20261124)
    await _store(pool, _events(tenant, 90, rng) + _events(neighbour, 20, rng))
    return tenant


async def _raw(pool: asyncpg.Pool, tenant: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM llm_usage_events WHERE tenant_id = $1", tenant)


@pytest.mark.parametrize("limit", [1, 4, 7, 100, 1000])
async def test_pages_walk_every_event_once_newest_first_through_ties(
    pool: asyncpg.Pool, tenant: str, limit: int
) -> None:
    rows = await _raw(pool, tenant)
    assert len(rows) == 90
    # Well over one event per instant: pages of every size here end inside a tie.
    assert len({row["occurred_at"] for row in rows}) == len(INSTANTS)
    in_range = _newest_first([r for r in rows if r["occurred_at"] >= NOW - timedelta(days=31)])
    headers = bearer(token("tenant-member", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        items, pages = await _walk(
            client,
            tenant,
            headers,
            {"from": _utc(NOW - timedelta(days=31)), "to": _utc(NOW), "limit": str(limit)},
        )
    # `to` is excluded: the events at exactly NOW are not in [from, to).
    expected = [_as_answered(r) for r in in_range if r["occurred_at"] < NOW]
    assert items == expected
    # Estimated charges say so, and from which price row.
    assert {item["charge_estimated"] for item in items} == {True, False}
    assert all(
        (item["price_effective_from"] is not None) == item["charge_estimated"] for item in items
    )
    assert len({item["gateway_request_id"] for item in items}) == len(items)
    assert pages == max(1, -(-len(expected) // limit))


async def test_the_default_range_is_this_month_up_to_now(pool: asyncpg.Pool, tenant: str) -> None:
    rows = await _raw(pool, tenant)
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        items, _pages = await _walk(
            client, tenant, bearer(token("tenant-member", tenant)), {"limit": "1000"}
        )
    expected = [
        _as_answered(r) for r in _newest_first(rows) if MONTH_START <= r["occurred_at"] < NOW
    ]
    assert items == expected
    assert 0 < len(expected) < len(rows)  # last month's events and those at `to` left out


@pytest.mark.parametrize(
    "filters",
    [
        {"user_id": "user_id-a"},
        {"agent_id": "agent_id-b"},
        {"deployment_id": "deployment_id-a", "model": "model-b"},
        {"user_id": "user_id-b", "agent_id": "agent_id-a", "model": "model-a"},
        {"user_id": "nobody"},
    ],
)
async def test_filters_select_equal_attributes(
    pool: asyncpg.Pool, tenant: str, filters: dict[str, str]
) -> None:
    rows = await _raw(pool, tenant)
    start, end = NOW - timedelta(days=40), NOW + timedelta(seconds=1)
    query = {"from": _utc(start), "to": _utc(end), "limit": "3", **filters}
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        items, _ = await _walk(client, tenant, bearer(token("tenant-admin", tenant)), query)
    expected = [
        _as_answered(r)
        for r in _newest_first(rows)
        if all(r[name] == value for name, value in filters.items())
    ]
    assert items == expected
    if filters != {"user_id": "nobody"}:
        assert 0 < len(items) < len(rows)


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'["yesterday", "req-1"]').decode(),
        base64.urlsafe_b64encode(b'{"occurred_at": "2026-01-01T00:00:00Z"}').decode(),
        base64.urlsafe_b64encode(b'["2026-01-01T00:00:00Z", ""]').decode(),
        "x" * 5000,
        # Ids no event has, NUL and a lone surrogate among them (asyncpg cannot send either).
        *(
            encode_cursor(EventPosition(NOW, request_id))
            for request_id in ("req\x00", "req-\ud800", "req\t1", " req")
        ),
    ],
)
async def test_a_malformed_cursor_is_a_422_naming_it(
    pool: asyncpg.Pool, tenant: str, cursor: str
) -> None:
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            f"/v1/tenants/{tenant}/usage/events",
            params={"cursor": cursor},
            headers=bearer(token("tenant-member", tenant)),
        )
    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [["query", "cursor"]]


async def test_a_tampered_cursor_is_a_422(pool: asyncpg.Pool, tenant: str) -> None:
    headers = bearer(token("tenant-member", tenant))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        url = f"/v1/tenants/{tenant}/usage/events"
        first = (await client.get(url, params={"limit": "2"}, headers=headers)).json()
        cursor = first["next_cursor"]
        assert cursor
        for tampered in (cursor[:-3], cursor[: len(cursor) // 2], "A" + cursor, cursor + "!"):
            answer = await client.get(url, params={"cursor": tampered}, headers=headers)
            assert answer.status_code == 422, (tampered, answer.text)
            assert answer.json()["detail"][0]["loc"] == ["query", "cursor"]
        # The cursor itself still works, and is bound to no filter: the tenant is the path's.
        again = await client.get(url, params={"cursor": cursor}, headers=headers)
        assert again.status_code == 200


async def test_a_cursor_never_reaches_another_tenants_events(
    pool: asyncpg.Pool, tenant: str
) -> None:
    other = unique("tenant")
    await _store(pool, _events(other, 5, random.Random(1)))
    cursor = encode_cursor(EventPosition(NOW + timedelta(days=1), "~"))
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        mine = await client.get(
            f"/v1/tenants/{tenant}/usage/events",
            params={"cursor": cursor, "limit": "1000"},
            headers=bearer(token("tenant-member", tenant)),
        )
        theirs = await client.get(
            f"/v1/tenants/{other}/usage/events",
            headers=bearer(token("tenant-member", tenant)),
        )
    assert {item["tenant_id"] for item in mine.json()["items"]} == {tenant}
    assert theirs.status_code == 403
    assert other not in theirs.text


async def test_the_page_plan_reads_the_identity_index_backwards_without_a_sort(
    pool: asyncpg.Pool,
) -> None:
    # A tenant large enough that the planner's choice is the one a large tenant gets (for a few
    # thousand events a bitmap scan and a sort are as cheap, and it may take them). Written
    # straight into the table: only the plan is under test here, not how rows arrive.
    tenant = unique("tenant")
    await pool.execute(
        """
        INSERT INTO llm_usage_events (gateway_request_id, tenant_id, user_id, input_tokens,
            output_tokens, cached_input_tokens, reasoning_tokens, total_tokens,
            customer_charge_usd, occurred_at)
        SELECT 'req-' || n, $1, (ARRAY['u-1', 'u-2', NULL])[n % 3 + 1], 10, 5, 0, 0, 15, 0.0054,
               $2::timestamptz - (n % 25000) * interval '173 seconds'
        FROM generate_series(1, 50000) AS n
        """,
        tenant,
        NOW,
    )
    start = NOW - timedelta(days=60)
    # Deep in the range (nine in ten of the tenant's events are newer), and near its top.
    deep = EventPosition(NOW - timedelta(days=45), "req-m")
    near = EventPosition(NOW - timedelta(days=1), "req-m")
    # One event in a hundred corrected (its user moved), as the consumers would leave it.
    await pool.execute(
        """
        INSERT INTO usage_event_effective (tenant_id, occurred_at, gateway_request_id,
            winner_occurred_at, winner_id, voided, user_id, input_tokens, output_tokens,
            cached_input_tokens, reasoning_tokens, total_tokens, customer_charge_usd,
            charge_estimated, corrections)
        SELECT tenant_id, occurred_at, gateway_request_id, $2, 'c-' || gateway_request_id,
               false, 'u-2', 10, 5, 0, 0, 15, 0.0054, false, 1
        FROM llm_usage_events WHERE tenant_id = $1 AND gateway_request_id LIKE '%00'
        """,
        tenant,
        NOW,
    )
    async with pool.acquire() as connection:
        await connection.execute("ANALYZE llm_usage_events")
        await connection.execute("ANALYZE usage_event_effective")
        identity = set(
            await connection.fetchval(
                "SELECT array_agg(c.relname::text) FROM pg_inherits AS i "
                "JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'llm_usage_events_identity'::regclass"
            )
        )
        blocks = {}
        for name, position, filters in [
            ("top", None, {}),
            ("deep", deep, {}),
            ("near", near, {}),
            ("deep, filtered", deep, {"user_id": "u-1"}),
        ]:
            query, arguments = page_statement(
                tenant, EventPageRequest(start, NOW, 10, after=position, filters=filters)
            )
            plan = await connection.fetchval(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", *arguments
            )
            top = json.loads(plan)[0]["Plan"]
            nodes = list(_plan_nodes(top))
            kinds = {node["Node Type"] for node in nodes}
            assert not kinds & {"Sort", "Incremental Sort"}, kinds
            scans = [node for node in nodes if "Scan" in node["Node Type"]]
            # The effective values: a probe of their key (the tenant's slice of it), never a
            # scan of every corrected event.
            effective = [s for s in scans if s["Relation Name"] == "usage_event_effective"]
            assert [s["Index Name"] for s in effective] == ["usage_event_effective_pkey"], top
            scans = [s for s in scans if s not in effective]
            assert scans
            for scan in scans:
                assert scan["Node Type"] == "Index Scan", scan
                assert scan["Scan Direction"] == "Backward", scan
                # Each month's partition of the identity index (tenant, occurred_at, id).
                assert scan["Index Name"] in identity, scan["Index Name"]
            blocks[name] = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    # A page deep in the range starts at its position: it reads about what the top page reads,
    # not the ~2,700 newer index entries (some 50 leaf pages) above it.
    # (Measured with 3,000 events: 13 at the top, 14 deep; 46 deep when the scan started from
    # `to` instead.)
    assert blocks["deep"] <= blocks["top"] + 10, blocks
    assert blocks["near"] <= blocks["top"] + 10, blocks


def _plan_nodes(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, str]] = []
        self.links: dict[str, str] = {}
        self.filters: dict[str, str] = {}
        self.titles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "tr" and found.get("class") == "event":
            self.events.append(found)
        elif tag == "a" and "id" in found:
            self.links[found["id"]] = found["href"]
        elif tag == "span" and found.get("class") == "filter":
            self.filters[found["data-name"]] = found["data-value"]
        elif tag == "td" and "charge" in found.get("class", ""):
            self.titles.append(found["title"])


async def _page(client: httpx.AsyncClient, url: str, **params: str) -> _Rows:
    # httpx replaces the address's own query with `params`, even an empty one.
    answer = await client.get(url, params=params) if params else await client.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    rows = _Rows()
    rows.feed(answer.text)
    return rows


async def test_the_page_shows_the_filtered_events_and_pages_both_ways(
    pool: asyncpg.Pool, tenant: str
) -> None:
    headers = bearer(token("tenant-member", tenant))
    query = {"user_id": "user_id-a", "from": _utc(NOW - timedelta(days=40)), "limit": "10"}
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        client.cookies.update({"llm_usage_token": token("tenant-member", tenant)})
        items, _ = await _walk(client, tenant, headers, {**query, "limit": "1000"})
        assert len(items) > 20  # more than two pages
        first = await _page(client, f"/ui/tenants/{tenant}/events", **query)
        assert first.filters == {"user_id": "user_id-a"}
        assert [row["data-id"] for row in first.events] == [
            item["gateway_request_id"] for item in items[:10]
        ]
        assert [row["data-charge"] for row in first.events] == [
            item["customer_charge_usd"] for item in items[:10]
        ]
        assert [unescape(t) for t in first.titles] == [
            f"{item['customer_charge_usd']} USD" for item in items[:10]
        ]
        assert "newer" not in first.links
        assert first.links["back"] == f"/ui/tenants/{tenant}"
        older = await _page(client, first.links["older"])
        assert [row["data-id"] for row in older.events] == [
            item["gateway_request_id"] for item in items[10:20]
        ]
        assert "older" in older.links
        newer = await _page(client, older.links["newer"])
        assert [row["data-id"] for row in newer.events] == [row["data-id"] for row in first.events]
        assert "newer" not in newer.links
        everything = await _page(client, first.links["all"])
        assert everything.filters == {}
        bad = await client.get(f"/ui/tenants/{tenant}/events", params={"cursor": "%%%"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "cursor"]
        client.cookies.update({"llm_usage_token": token("tenant-member", unique("tenant"))})
        assert (await client.get(f"/ui/tenants/{tenant}/events")).status_code == 403


async def test_policy_history_is_newest_first_for_tenant_admins_only(pool: asyncpg.Pool) -> None:
    tenant = unique("tenant")
    url = f"/v1/tenants/{tenant}/budget-policies"
    admin = bearer(token("tenant-admin", tenant, sub="carol@acme"))
    changes = [
        ("carol@acme", {"scope_type": "tenant", "monthly_limit_usd": "100"}),
        ("carol@acme", {"scope_type": "user", "scope_id": "u-1", "daily_limit_usd": "5"}),
        ("ops-bot", {"scope_type": "tenant", "monthly_limit_usd": "250.50"}),
    ]
    async with api_client(pool) as (client, _):
        for actor, body in changes:
            headers = admin if actor == "carol@acme" else bearer(token("platform-admin", sub=actor))
            answer = await client.put(url, content=json.dumps(body), headers=headers)
            assert answer.status_code == 200, answer.text
        deleted = await client.delete(
            url, params={"scope_type": "user", "scope_id": "u-1"}, headers=admin
        )
        assert deleted.status_code == 200
        history = await client.get(f"{url}/history", headers=admin)
        member = await client.get(f"{url}/history", headers=bearer(token("tenant-member", tenant)))
    assert history.status_code == 200, history.text
    items = history.json()["items"]
    assert [(i["actor"], i["scope_type"], i["scope_id"]) for i in items] == [
        ("carol@acme", "user", "u-1"),
        ("ops-bot", "tenant", tenant),
        ("carol@acme", "user", "u-1"),
        ("carol@acme", "tenant", tenant),
    ]
    times = [i["changed_at"] for i in items]
    assert times == sorted(times, reverse=True)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[0-9:.]+Z", t) for t in times)
    assert items[0]["new_policy"] is None
    assert items[0]["old_policy"]["daily_limit_usd"] == "5"
    assert items[1]["old_policy"]["monthly_limit_usd"] == "100"
    assert items[1]["new_policy"]["monthly_limit_usd"] == "250.5"
    assert items[3]["old_policy"] is None
    assert member.status_code == 403


@pytest.mark.parametrize("name", ["user_id", "agent_id", "deployment_id", "model"])
@pytest.mark.parametrize("page", [False, True])
async def test_a_filter_no_stored_text_can_hold_is_a_422_naming_it(
    pool: asyncpg.Pool, name: str, page: bool
) -> None:
    tenant = unique("tenant")
    url = f"/ui/tenants/{tenant}/events" if page else f"/v1/tenants/{tenant}/usage/events"
    async with api_client(pool, clock=lambda: NOW) as (client, _):
        answer = await client.get(
            url,
            params={name: "user\x00a"},
            headers=bearer(token("tenant-member", tenant)),
        )
        # Any other control character may be in a stored attribute: it is searched for.
        tab = await client.get(
            url, params={name: "a\tb"}, headers=bearer(token("tenant-member", tenant))
        )
    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [["query", name]]
    assert tab.status_code == 200, tab.text


def test_a_lone_surrogate_in_a_filter_is_refused_before_the_database() -> None:
    # A query string cannot carry one (Starlette decodes it with replacement characters), but
    # the check is the query's own, whatever builds it.
    with pytest.raises(RequestValidationError) as raised:
        event_query(
            now=NOW,
            from_text=None,
            to_text=None,
            filters={"user_id": "a", "model": "gpt-\ud800"},
            limit=10,
            cursor=None,
        )
    [error] = raised.value.errors()
    assert error["loc"] == ("query", "model")
    assert error["input"] == "gpt-\\ud800"
