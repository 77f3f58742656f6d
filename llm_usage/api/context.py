"""What the API's routes share: settings, the database pool, the token verifier, the clock, the
metrics, and the usage-topic producer (started on the first ingest, so reads never wait for
Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Histogram

from llm_usage.api.auth import TokenVerifier
from llm_usage.core.clock import worker_clock
from llm_usage.core.settings import Settings


class ApiMetrics:
    """`llm_usage_api_*`: requests and latency per route template and status, ingest results,
    budget checks."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "llm_usage_api_requests_total",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "llm_usage_api_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            # 1 and 2.5 ms: a budget check's p99 goal is 10 ms.
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.ingested = Counter(
            "llm_usage_api_ingested_events_total",
            "Usage events posted to /v1/usage-events, by result (accepted: on the usage topic)",
            ["result"],
            registry=registry,
        )
        self.budget_checks = Counter(
            "llm_usage_api_budget_checks_total",
            "Budget checks answered, by decision (allow, deny) and answer (new: decided now; "
            "repeat: the first answer of its id; counted: its event was already counted)",
            ["decision", "answer"],
            registry=registry,
        )
        self.budget_check_denials = Counter(
            "llm_usage_api_budget_check_denials_total",
            "Blocking limits that denied a new budget check, by scope type and window (a deny "
            "may name several)",
            ["scope_type", "window"],
            registry=registry,
        )


@dataclass
class ApiContext:
    settings: Settings
    pool: asyncpg.Pool
    verifier: TokenVerifier
    metrics: ApiMetrics
    clock: Callable[[], datetime] = field(default_factory=worker_clock)
    # Set once the first ingest has started it; guarded by the lock so it is started once.
    producer: AIOKafkaProducer | None = None
    producer_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def usage_producer(self) -> AIOKafkaProducer:
        """The idempotent producer (acks=all) of the usage topic, started on first use."""
        from llm_usage.kafka.clients import (  # noqa: PLC0415 - Kafka, late
            new_producer,
            start_client,
        )

        async with self.producer_lock:
            if self.producer is None:
                producer = new_producer(self.settings)
                await start_client(producer, self.settings)
                self.producer = producer
            return self.producer

    async def close(self) -> None:
        """Stop the producer (after flushing what it holds); the pool is its owner's."""
        async with self.producer_lock:
            if self.producer is not None:
                await self.producer.stop()
                self.producer = None


def api_context(request: Request) -> ApiContext:
    """The context the app was created over (a FastAPI dependency)."""
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(api_context)]
