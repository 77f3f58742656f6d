"""The policy watcher: a policy set (or lowered) below the spend already recorded alerts within
seconds, without waiting for an event.

It LISTENs for the `budget_policies` notification that every policy change sends in its own
transaction and then checks that tenant's policies against the current day's and month's
counters. Every `BUDGET_POLICY_SWEEP_SECONDS` it checks all policies: the safety net for a
notification missed while disconnected, and for an event that was counted against a policy
being changed at the same moment. Alerts are inserted under their unique key, so checking twice
never alerts twice.
"""

from __future__ import annotations

import asyncio

import structlog

from llm_usage.consumers.budget.alerts import alert_id_of, alerts_at_rest, crossings_at_rest_of
from llm_usage.runtime.handler import ConsumerContext
from llm_usage.runtime.retry import is_transient, sleep_unless_stopping
from llm_usage.storage.budget_outbox import insert_alerts, known_alert_ids
from llm_usage.storage.budget_status import current_policy_windows
from llm_usage.storage.pool import close_connection, connect_once, connection_from

log = structlog.get_logger(__name__)

POLICIES_CHANNEL = "budget_policies"


async def watch_policies(context: ConsumerContext) -> None:
    """The watcher as a side task of the budget consumer."""
    await PolicyWatcher(context).run()


class PolicyWatcher:
    def __init__(self, context: ConsumerContext) -> None:
        self._context = context
        self._clock = context.clock
        self._changed: asyncio.Queue[str] = asyncio.Queue()
        self._sleep = sleep_unless_stopping(context.stopping)

    async def run(self) -> None:
        stopping = self._context.stopping
        while not stopping.is_set():
            try:
                await self._listen_and_check()
            except Exception as error:
                if not is_transient(error):
                    raise
                log.warning("Policy watcher paused.", error=f"{type(error).__name__}: {error}")
                await self._sleep(1.0)

    async def _listen_and_check(self) -> None:
        settings = self._context.settings
        listener = await connect_once(settings.database_url)
        try:
            await listener.add_listener(POLICIES_CHANNEL, self._on_notify)
            await self.check(tenant_id=None)  # anything changed while nobody listened
            while not self._context.stopping.is_set():
                tenant = await self._next_change(settings.budget_policy_sweep_seconds)
                if listener.is_closed():
                    raise ConnectionResetError("the policy watcher's connection closed")
                await self.check(tenant_id=tenant)
        finally:
            await close_connection(listener)

    def _on_notify(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        self._changed.put_nowait(str(payload))

    async def _next_change(self, sweep_seconds: float) -> str | None:
        """The tenant whose policy changed next, or None when it is time to check them all."""
        getting = asyncio.ensure_future(self._changed.get())
        stop = asyncio.ensure_future(self._context.stopping.wait())
        try:
            await asyncio.wait(
                {getting, stop}, timeout=sweep_seconds, return_when="FIRST_COMPLETED"
            )
        finally:
            stop.cancel()
        if getting.done():
            return getting.result() or None
        getting.cancel()
        return None

    async def check(self, *, tenant_id: str | None) -> list[str]:
        """Alert every policy (of one tenant, or all) whose current spend is past a level."""
        now = self._clock()
        async with connection_from(self._context.pool) as connection, connection.transaction():
            windows = await current_policy_windows(connection, now=now, tenant_id=tenant_id)
            reached = crossings_at_rest_of(windows)
            # The sweep finds thousands of levels reached long ago: build only the new alerts.
            known = await known_alert_ids(connection, [alert_id_of(*each) for each in reached])
            alerts = alerts_at_rest(reached, now=now, known_ids=known)
            added = await insert_alerts(connection, alerts)
        if added:
            log.info("Policies already past a level alerted.", tenant=tenant_id, alerts=len(added))
        return added
