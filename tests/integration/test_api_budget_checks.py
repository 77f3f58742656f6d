"""`POST /v1/budget-checks` through real `serve api` processes (design §10): 500 checks at once
against a blocking limit allow exactly what fits, with one process or two on one port, across
scopes; the tokens form; repeats; already counted; a deny's contents; and crashes of the API, by
the fault point after the decision and by SIGKILL with checks in flight."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from llm_usage.api.routes.budget_checks import FAULT_CHECK_ANSWERED
from llm_usage.core.faults import FAULT_EXIT_CODE, FAULT_VARIABLE
from llm_usage.domain.budgets import ScopeType, SpendKey
from llm_usage.domain.holds import hold_counters
from llm_usage.domain.periods import utc_day
from llm_usage.domain.prices import new_price
from llm_usage.storage.budget_holds import held_by_counter
from llm_usage.storage.budget_spend import (
    add_to_counters,
    count_staged_events,
    stage_events,
)
from llm_usage.storage.prices import add_prices
from tests import clock
from tests.api_support import bearer, token
from tests.integration.budget_check_support import Api, block_policy, serving
from tests.integration.pipeline import unique

CHECKS = 500


@contextlib.asynccontextmanager
async def client(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CHECKS, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as http:
        yield http


async def post_check(http: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await http.post(
        "/v1/budget-checks", json=body, headers=bearer(token("gateway", sub="gateway@test"))
    )


async def check_all(http: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(post_check(http, body) for body in bodies))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return [answer.json() for answer in answers]


def charge_check(tenant: str, amount: str = "1", **fields: Any) -> dict[str, Any]:
    return {
        "gateway_request_id": unique("req"),
        "tenant_id": tenant,
        "estimated_charge_usd": amount,
        **fields,
    }


async def metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# --- the database -------------------------------------------------------------------------------


async def count_event(
    pool: asyncpg.Pool, tenant: str, request_id: str, charge: Decimal, *, user_id: str | None = None
) -> None:
    """The budget consumer's counting of one event, now: the id counted, its spend added."""
    occurred_at = clock.earlier_today()
    async with pool.acquire() as connection, connection.transaction():
        await stage_events(
            connection,
            [
                (request_id, tenant, None, user_id, None, utc_day(occurred_at), charge,
                 0, 0, 0, 0, 0, occurred_at),
            ],
        )  # fmt: skip
        assert not await count_staged_events(connection)
        await add_to_counters(connection, evaluated_from=utc_day(occurred_at), staged=True)


async def holds_of(pool: asyncpg.Pool, tenant: str) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM budget_holds WHERE tenant_id = $1", tenant)
    return {row["gateway_request_id"]: row for row in rows}


def open_amounts(holds: dict[str, asyncpg.Record]) -> dict[SpendKey, Decimal]:
    """Σ amount of the open holds per counter, from the rows alone."""
    amounts: defaultdict[SpendKey, Decimal] = defaultdict(Decimal)
    for row in holds.values():
        if row["state"] == "open":
            keys = hold_counters(
                row["tenant_id"], row["deployment_id"], row["user_id"], row["agent_id"], row["day"]
            )
            for key in keys:
                amounts[key] += row["amount_usd"]
    return dict(amounts)


async def assert_bookkeeping(pool: asyncpg.Pool, tenant: str) -> dict[str, asyncpg.Record]:
    """Every counter holds exactly the open holds placed on it: nothing half-written."""
    holds = await holds_of(pool, tenant)
    async with pool.acquire() as connection:
        held = {key: amount for key, amount in (await held_by_counter(connection, tenant)).items()}
    expected = open_amounts(holds)
    assert {key: amount for key, amount in held.items() if amount} == expected
    return holds


class Monitor:
    """Samples spend + held per counter of one tenant in one statement (one snapshot) every
    10 ms while load runs; `highest` is the largest of each counter seen."""

    _SAMPLE = """
        SELECT h.scope_type, h.scope_id, h."window",
               coalesce(s.spend_usd, 0) + h.placed_usd - h.ended_usd AS taken
        FROM budget_held AS h
        LEFT JOIN budget_spend AS s USING (tenant_id, scope_type, scope_id, "window", period_start)
        WHERE h.tenant_id = $1
    """

    def __init__(self, pool: asyncpg.Pool, tenant: str) -> None:
        self.pool, self.tenant = pool, tenant
        self.highest: dict[tuple[str, str, str], Decimal] = {}
        self.samples = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            for row in await self.pool.fetch(self._SAMPLE, self.tenant):
                key = (row["scope_type"], row["scope_id"], row["window"])
                self.highest[key] = max(self.highest.get(key, Decimal(0)), row["taken"])
            self.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.01)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[Monitor]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            self._stop.set()
            await task


def decisions(answers: list[dict[str, Any]]) -> Counter[str]:
    return Counter(answer["decision"] for answer in answers)


# --- the tests ----------------------------------------------------------------------------------


async def _fifty_of_five_hundred(api: Api, pool: asyncpg.Pool, tenant: str) -> None:
    await block_policy(pool, tenant, daily="50")
    monitor = Monitor(pool, tenant)
    async with client(api) as http, monitor.watching():
        answers = await check_all(http, [charge_check(tenant) for _ in range(CHECKS)])
    assert decisions(answers) == {"allow": 50, "deny": 450}
    for answer in answers:
        if answer["decision"] == "allow":
            assert answer["denied_by"] == []
            assert answer["hold_expires_at"] is not None
        else:
            assert answer["hold_expires_at"] is None
            [limit] = answer["denied_by"]
            assert (limit["scope_type"], limit["scope_id"], limit["window"]) == (
                "tenant", tenant, "daily",
            )  # fmt: skip
            assert (limit["limit_usd"], limit["spend_usd"], limit["held_usd"]) == ("50", "0", "50")
        assert answer["estimated_charge_usd"] == "1"
    assert monitor.samples > 0
    assert max(monitor.highest.values()) <= Decimal(50)
    holds = await assert_bookkeeping(pool, tenant)
    assert Counter(row["state"] for row in holds.values()) == {"open": 50, "denied": 450}


async def test_500_checks_allow_exactly_50(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with serving(database_url, tmp_path) as api:
        await _fifty_of_five_hundred(api, pool, unique("tenant"))
        async with client(api) as http:
            assert (
                await metric(
                    http, "llm_usage_api_budget_checks_total", decision="allow", answer="new"
                )
                == 50
            )
            assert await metric(
                http, "llm_usage_api_budget_check_denials_total", scope_type="tenant",
                window="daily",
            ) == 450  # fmt: skip


async def test_two_api_processes_on_one_port_allow_exactly_50_too(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with serving(database_url, tmp_path, count=2) as api:
        await _fifty_of_five_hundred(api, pool, unique("tenant"))
        assert all(process.returncode is None for process in api.processes)


async def test_checks_over_six_scopes_hold_every_limit(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    users = [f"user-{index}" for index in range(6)]
    await block_policy(pool, tenant, daily="50")
    for user in users:
        await block_policy(pool, tenant, ScopeType.USER, user, daily="10")
    monitor = Monitor(pool, tenant)
    bodies = [charge_check(tenant, user_id=users[index % 6]) for index in range(CHECKS)]
    async with serving(database_url, tmp_path) as api, client(api) as http, monitor.watching():
        answers = await check_all(http, bodies)
    assert decisions(answers)["allow"] == 50
    allowed = Counter(
        body["user_id"] for body, answer in zip(bodies, answers, strict=True)
        if answer["decision"] == "allow"
    )  # fmt: skip
    assert all(count <= 10 for count in allowed.values()), allowed
    assert monitor.highest[("tenant", tenant, "daily")] <= 50
    for user in users:
        assert monitor.highest.get(("user", user, "daily"), Decimal(0)) <= 10
    await assert_bookkeeping(pool, tenant)


async def test_the_tokens_form_is_priced_from_the_price_table_and_without_a_price_is_422(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, provider = unique("tenant"), unique("provider")
    price = new_price(
        provider, "m", clock.now() - timedelta(days=1),
        input=Decimal("2.5"), output=Decimal("10"), cached_input=Decimal("1.25"),
        reasoning=None, request_fee_usd=Decimal("0.0001"),
    )  # fmt: skip
    async with pool.acquire() as connection:
        await add_prices(connection, [price], actor="test", earliest=True)
    tokens = {
        "provider": provider,
        "model": "m",
        "estimated_input_tokens": 1000,
        "estimated_cached_input_tokens": 400,
        "estimated_output_tokens": 300,
    }
    # (600 x 2.5 + 400 x 1.25 + 300 x 10) / 10^6 + 0.0001
    expected = Decimal("0.0051")
    async with serving(database_url, tmp_path) as api, client(api) as http:
        answer = await post_check(
            http, {"gateway_request_id": unique("req"), "tenant_id": tenant, **tokens}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["decision"] == "allow"
        assert answer.json()["estimated_charge_usd"] == str(expected)
        [row] = (await holds_of(pool, tenant)).values()
        assert row["amount_usd"] == expected

        unpriced = {**tokens, "model": "no-such-model"}
        refused = await post_check(
            http, {"gateway_request_id": unique("req"), "tenant_id": tenant, **unpriced}
        )
    assert refused.status_code == 422, refused.text
    assert [error["loc"] for error in refused.json()["detail"]] == [
        ["body", "provider"], ["body", "model"],
    ]  # fmt: skip
    assert "send estimated_charge_usd" in refused.json()["detail"][0]["msg"]
    assert len(await holds_of(pool, tenant)) == 1


async def test_a_repeated_id_answers_the_first_answer_and_holds_once(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    await block_policy(pool, tenant, daily="5")
    allowed, denied = charge_check(tenant, "3"), charge_check(tenant, "3")
    async with serving(database_url, tmp_path) as api, client(api) as http:
        first_allow = await post_check(http, allowed)
        first_deny = await post_check(http, denied)
        assert (first_allow.json()["decision"], first_deny.json()["decision"]) == ("allow", "deny")
        # Sequential and concurrent repeats, one with another body under the same id.
        repeats = [await post_check(http, {**allowed, "estimated_charge_usd": "0.01"})]
        repeats += await asyncio.gather(*(post_check(http, body) for body in [allowed] * 20))
        deny_repeats = await asyncio.gather(*(post_check(http, body) for body in [denied] * 5))
        assert {answer.content for answer in repeats} == {first_allow.content}
        assert {answer.content for answer in deny_repeats} == {first_deny.content}
        # Both events counted since (a gateway failing open may send a denied one): a repeat
        # still answers the first answer, not "counted".
        for body in (allowed, denied):
            await count_event(pool, tenant, body["gateway_request_id"], Decimal(3))
        after = [await post_check(http, body) for body in (allowed, denied)]
        assert [answer.content for answer in after] == [first_allow.content, first_deny.content]
        assert (
            await metric(
                http, "llm_usage_api_budget_checks_total", decision="allow", answer="repeat"
            )
            == 22
        )
        assert await metric(http, "llm_usage_api_budget_check_denials_total") == 1
    holds = await assert_bookkeeping(pool, tenant)
    assert holds[allowed["gateway_request_id"]]["amount_usd"] == 3
    assert len(holds) == 2


async def test_an_already_counted_request_is_allowed_with_no_hold(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, other = unique("tenant"), unique("tenant")
    await block_policy(pool, tenant, daily="5")
    counted = charge_check(tenant, "4")
    await count_event(pool, tenant, counted["gateway_request_id"], Decimal(4))
    async with serving(database_url, tmp_path) as api, client(api) as http:
        answer = (await post_check(http, counted)).json()
        # The same id under another tenant is another request: it is decided, and held.
        elsewhere = (await post_check(http, {**counted, "tenant_id": other})).json()
        assert (
            await metric(
                http, "llm_usage_api_budget_checks_total", decision="allow", answer="counted"
            )
            == 1
        )
    assert answer == {
        "decision": "allow", "denied_by": [], "hold_expires_at": None,
        "estimated_charge_usd": "4",
    }  # fmt: skip
    assert await holds_of(pool, tenant) == {}
    assert elsewhere["decision"] == "allow"
    assert elsewhere["hold_expires_at"] is not None
    assert list(await holds_of(pool, other)) == [counted["gateway_request_id"]]


async def test_a_deny_names_each_blocking_limit_it_would_break_in_order(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    await block_policy(pool, tenant, monthly="100", daily="10")
    await block_policy(pool, tenant, ScopeType.USER, "u-1", daily="2.5")
    await block_policy(pool, tenant, ScopeType.DEPLOYMENT, "d-1", monthly="1000")  # room left
    await count_event(pool, tenant, unique("spent"), Decimal("1.5"), user_id="u-1")
    async with serving(database_url, tmp_path) as api, client(api) as http:
        held = await post_check(http, charge_check(tenant, "0.5", user_id="u-1"))
        assert held.json()["decision"] == "allow"
        denied = await post_check(
            http, charge_check(tenant, "8.25", user_id="u-1", deployment_id="d-1")
        )
    assert denied.json() == {
        "decision": "deny",
        "denied_by": [
            {"scope_type": "tenant", "scope_id": tenant, "window": "daily", "limit_usd": "10",
             "spend_usd": "1.5", "held_usd": "0.5"},
            {"scope_type": "user", "scope_id": "u-1", "window": "daily", "limit_usd": "2.5",
             "spend_usd": "1.5", "held_usd": "0.5"},
        ],
        "hold_expires_at": None,
        "estimated_charge_usd": "8.25",
    }  # fmt: skip


async def test_an_api_crash_after_the_decision_then_a_repeat_answers_it_placed_once(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    await block_policy(pool, tenant, daily="10")
    body = charge_check(tenant, "4")
    async with serving(database_url, tmp_path, env={FAULT_VARIABLE: FAULT_CHECK_ANSWERED}) as api:
        async with client(api) as http:
            try:
                answer = await post_check(http, body)
            except httpx.TransportError:
                answer = None
            assert answer is None, answer.text
        assert await asyncio.wait_for(api.processes[0].wait(), 30) == FAULT_EXIT_CODE
        api.processes.clear()
        [row] = (await holds_of(pool, tenant)).values()
        assert (row["decision"], row["state"], row["amount_usd"]) == ("allow", "open", 4)

        await api.start()  # without the fault
        async with client(api) as http:
            repeated = (await post_check(http, body)).json()
            assert (
                await metric(
                    http, "llm_usage_api_budget_checks_total", decision="allow", answer="repeat"
                )
                == 1
            )
    assert repeated["decision"] == "allow"
    assert repeated["estimated_charge_usd"] == "4"
    expires_at = datetime.fromisoformat(repeated["hold_expires_at"])
    assert expires_at == row["expires_at"].astimezone(UTC)
    holds = await assert_bookkeeping(pool, tenant)
    assert open_amounts(holds)[hold_counters(tenant, None, None, None, row["day"])[0]] == 4


async def test_a_sigkill_with_300_checks_in_flight_leaves_nothing_half_written(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant = unique("tenant")
    await block_policy(pool, tenant, daily="100")
    bodies = [charge_check(tenant, user_id=f"u-{index % 3}") for index in range(300)]
    async with serving(database_url, tmp_path) as api:
        async with client(api) as http:
            some_answered = asyncio.Event()
            answered_count = 0

            def one_answered(_: asyncio.Task[httpx.Response]) -> None:
                nonlocal answered_count
                answered_count += 1
                if answered_count == 30:
                    some_answered.set()

            flight = [asyncio.create_task(post_check(http, body)) for body in bodies]
            for task in flight:
                task.add_done_callback(one_answered)
            # Kill once some checks are answered and the others are still on their way.
            await asyncio.wait_for(some_answered.wait(), 60)
            api.processes[0].send_signal(signal.SIGKILL)
            results = await asyncio.gather(*flight, return_exceptions=True)
        await api.stop()
        answered = [r for r in results if isinstance(r, httpx.Response)]
        assert len(answered) < len(bodies), "the kill came after every answer"
        holds = await assert_bookkeeping(pool, tenant)
        assert 30 <= len(holds) < len(bodies)
        for body, result in zip(bodies, results, strict=True):
            if isinstance(result, httpx.Response) and result.status_code == 200:
                assert holds[body["gateway_request_id"]]["decision"] == result.json()["decision"]

        await api.start()
        async with client(api) as http:
            retried = await check_all(http, bodies)
    for body, answer in zip(bodies, retried, strict=True):
        row = holds.get(body["gateway_request_id"])
        if row is not None:
            assert answer["decision"] == row["decision"]
    assert decisions(retried) == {"allow": 100, "deny": 200}
    final = await assert_bookkeeping(pool, tenant)
    assert len(final) == len(bodies)
    assert sum(row["amount_usd"] for row in final.values() if row["state"] == "open") == 100
