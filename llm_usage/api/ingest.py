"""`POST /v1/usage-events`: events checked with the usage consumer's own decoder, the valid ones
published to the usage topic before the answer.

The body is split into its events without losing anything the consumer would see: numbers keep
their literal digits, strings their escapes' meaning, objects every member in order (a field
named twice stays named twice). Each event is written back as compact JSON, checked with
`decode_usage_event` exactly as the consumer will check those bytes, and published unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, NoReturn

from aiokafka import AIOKafkaProducer

from llm_usage.schemas.dead_letter import DeadLetterReason, Rejection
from llm_usage.schemas.decoding import decode_usage_event
from llm_usage.schemas.usage_event import UnpricedEvent

MAX_EVENTS: Final = 1000
MAX_EVENT_BYTES: Final = 64 * 1024
# Room for the largest array the contract allows, with its separators and some whitespace.
MAX_BODY_BYTES: Final = MAX_EVENTS * (MAX_EVENT_BYTES + 16) + 1024 * 1024


class _Number(str):
    """A JSON number as its literal text, written back unchanged."""


class _Members(list[tuple[str, object]]):
    """A JSON object as its members, in order, duplicates kept."""


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_Members,
    parse_float=_Number,
    parse_int=_Number,
    parse_constant=_refuse_constant,
)


class MalformedBodyError(ValueError):
    """The body as a whole cannot be read as events; the message says why."""


def _write(value: object, out: list[str]) -> None:
    if isinstance(value, _Members):
        out.append("{")
        for index, (name, member) in enumerate(value):
            if index:
                out.append(",")
            out.append(json.dumps(name))
            out.append(":")
            _write(member, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")
    elif isinstance(value, _Number):
        out.append(str.__str__(value))
    else:  # str, bool, None: ASCII escapes keep even a lone surrogate as it was sent
        out.append(json.dumps(value))


def encode_event(value: object) -> bytes:
    """One parsed event back to compact JSON bytes that mean exactly what was sent."""
    out: list[str] = []
    _write(value, out)
    return "".join(out).encode()


def split_events(body: bytes) -> list[object]:
    """The events of a body: an array's elements (at most MAX_EVENTS), or the one value sent."""
    try:
        value = _DECODER.decode(body.decode())
    except UnicodeDecodeError as error:
        raise MalformedBodyError(f"not UTF-8: {error.reason} at byte {error.start}") from None
    except ValueError as error:
        raise MalformedBodyError(f"not JSON: {error}") from None
    except RecursionError:
        raise MalformedBodyError("not JSON: nested too deeply to read") from None
    if isinstance(value, list) and not isinstance(value, _Members):
        if len(value) > MAX_EVENTS:
            raise MalformedBodyError(
                f"an array of {len(value)} events; at most {MAX_EVENTS} are accepted at once"
            )
        return value
    return [value]


def _gateway_request_id(value: object) -> str | None:
    if isinstance(value, _Members):
        for name, member in value:
            if name == "gateway_request_id":
                return (
                    member if isinstance(member, str) and not isinstance(member, _Number) else None
                )
    return None


@dataclass(frozen=True)
class Checked:
    """One posted event: its bytes and key when valid, why not when rejected."""

    gateway_request_id: str | None
    value: bytes
    key: bytes | None  # the tenant id, for a valid event
    reason: DeadLetterReason | None
    detail: str | None

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def status(self) -> Literal["accepted", "rejected"]:
        return "accepted" if self.accepted else "rejected"


def check_events(events: Sequence[object], *, now: datetime) -> list[Checked]:
    """Each event as the usage consumer would judge the bytes that will be published."""
    checked = []
    for value in events:
        raw = encode_event(value)
        decoded = decode_usage_event(raw, now=now)
        if isinstance(decoded, Rejection):
            checked.append(
                Checked(_gateway_request_id(value), raw, None, decoded.reason, decoded.detail)
            )
        else:
            # An event without a charge is accepted too: the consumers price it from the price
            # table, or dead-letter it `unpriced`.
            row = decoded.row if isinstance(decoded, UnpricedEvent) else decoded
            checked.append(Checked(row.gateway_request_id, raw, row.tenant_id.encode(), None, None))
    return checked


async def publish(producer: AIOKafkaProducer, topic: str, checked: Sequence[Checked]) -> None:
    """Publish the accepted events (keyed by tenant) and wait until the brokers have them all
    (acks=all); any failure raises, and then the caller answers that nothing is settled."""
    deliveries = [
        await producer.send(topic, value=event.value, key=event.key)
        for event in checked
        if event.accepted
    ]
    await asyncio.gather(*deliveries)
