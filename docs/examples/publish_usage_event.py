"""Publish one usage event the way the gateway should: idempotent producer, acks=all, key=tenant.

Run against the local stack:
    eval "$(llm-usage dev env)" && python docs/examples/publish_usage_event.py
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer


def usage_event() -> dict[str, object]:
    return {
        "event_type": "llm_usage_recorded",
        "schema_version": 1,
        # Generate the id once per request and reuse it on every retry: it is the idempotency key.
        "gateway_request_id": f"req-{uuid.uuid4()}",
        "tenant_id": "acme",
        "deployment_id": "support-bot",
        "user_id": "user-42",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "request_kind": "chat.completions",
        "input_tokens": 1200,
        "output_tokens": 300,
        "upstream_cost_usd": "0.00036",
        # A string keeps every digit; never compute charges with floats.
        "customer_charge_usd": "0.000432",
        "customer_charge_cents": 0,
        "markup_mode": "flat_percent",
        "occurred_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


async def main() -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        enable_idempotence=True,  # implies acks="all": no loss, no duplicates from retries
        acks="all",
        linger_ms=5,
    )
    await producer.start()
    try:
        event = usage_event()
        metadata = await producer.send_and_wait(
            os.environ.get("USAGE_TOPIC", "llm_usage_recorded"),
            key=str(event["tenant_id"]).encode(),
            value=json.dumps(event).encode(),
        )
        print(f"published {event['gateway_request_id']} to partition {metadata.partition}")
    finally:
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
