"""`llm-usage events void|amend|show`: correct a stored usage event, or show it with its
corrections.

`void` and `amend` find the event (only a stored event is corrected, as by the API), publish an
`llm_usage_corrected` event to the usage topic keyed by its tenant, wait for the brokers' ack and
print the correction's id; the consumers apply it shortly after. An amend is published with
every corrigible field: the flags given over the event's current effective values. A mistake in
the flags, an event that is not stored, and a database or broker that cannot be reached each end
in one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from llm_usage.cli.args import (
    Commands,
    OneLineArgumentParser,
    checked_instant,
    checked_tenant,
    non_negative_int,
)
from llm_usage.cli.budget_tables import aligned_table, budget_tables
from llm_usage.cli.policy import default_actor
from llm_usage.core.clock import worker_clock
from llm_usage.core.errors import ConfigurationError, ServiceUnreachableError, UserFacingError
from llm_usage.domain.ids import is_clean_id, is_storable_text

if TYPE_CHECKING:
    from llm_usage.core.settings import Settings
    from llm_usage.schemas.correction_request import CorrectionAsked, InvalidCorrectionError
    from llm_usage.storage.pool import Connection
    from llm_usage.storage.usage_event_pages import StoredUsageEvent

_MAX_ID_LENGTH: Final = 200
_TABLES: Final = "usage events and corrections"

# The count flags of `amend`, each setting the corrigible field of its name.
COUNT_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
# The attribution flags: `--deployment-id ID` sets it, `--no-deployment` empties it.
ATTRIBUTIONS: Final = {"deployment_id": "deployment", "user_id": "user", "agent_id": "agent"}
# Each corrigible field's flag, to name it in an error.
FLAGS: Final = {
    **{name: "--" + name.replace("_", "-") for name in (*COUNT_FIELDS, *ATTRIBUTIONS)},
    "customer_charge_usd": "--charge-usd",
    "customer_charge_cents": "--charge-cents",
    "reason": "--reason",
    "actor": "--actor",
    "correction_id": "--correction-id",
    "occurred_at": "--occurred-at",
}


def default_actor_at_host() -> str:
    """Who corrects when `--actor` is not given: `user@host`."""
    return f"{default_actor()}@{socket.gethostname() or 'unknown'}"


def checked_request_id(text: str) -> str:
    """`--id`, checked when the command runs: the contract's id rule."""
    if not 1 <= len(text) <= _MAX_ID_LENGTH:
        raise ConfigurationError(f"--id must be 1 to {_MAX_ID_LENGTH} characters")
    if not (is_clean_id(text) and is_storable_text(text)):
        raise ConfigurationError(
            "--id must have no leading or trailing whitespace and no control characters"
        )
    return text


def asked_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields an `amend` sets, as JSON values, from its flags."""
    changes: dict[str, Any] = {
        name: getattr(args, name) for name in COUNT_FIELDS if getattr(args, name) is not None
    }
    if args.charge_usd is not None:
        changes["customer_charge_usd"] = args.charge_usd
    if args.charge_cents is not None:
        changes["customer_charge_cents"] = args.charge_cents
    for name, noun in ATTRIBUTIONS.items():
        if getattr(args, f"no_{noun}"):
            changes[name] = None
        elif getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if not changes:
        flags = ", ".join(FLAGS[name] for name in (*COUNT_FIELDS, "customer_charge_usd"))
        raise ConfigurationError(
            f"amend changes at least one field: give {flags}, --deployment-id, --user-id, "
            "--agent-id or one of --no-deployment, --no-user, --no-agent"
        )
    return changes


async def _stored_event(
    connection: Connection,
    tenant_id: str | None,
    gateway_request_id: str,
    hint: datetime | None,
) -> StoredUsageEvent:
    from llm_usage.storage.event_history import (  # noqa: PLC0415 - when a command runs
        correction_waiting,
        find_event,
        window_tenant,
    )

    if tenant_id is None:
        tenant_id = await window_tenant(connection, gateway_request_id)
        if tenant_id is None:
            raise UserFacingError(
                f"{gateway_request_id!r} is not in the id window; pass --tenant (ids repeat "
                "across tenants past the window)"
            )
    event = await find_event(connection, tenant_id, gateway_request_id, occurred_at=hint)
    if event is None:
        waiting = await correction_waiting(connection, tenant_id, gateway_request_id)
        raise UserFacingError(
            f"tenant {tenant_id!r} has no stored event {gateway_request_id!r}"
            + ("; a correction of it waits for it" if waiting else "")
            + " (only stored events are corrected)"
        )
    return event


async def events_show(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.api.correction_models import EventHistoryAnswer  # noqa: PLC0415
    from llm_usage.storage.event_history import event_history  # noqa: PLC0415

    gateway_request_id = checked_request_id(args.gateway_request_id)
    tenant_id = None if args.tenant is None else checked_tenant(args.tenant)
    hint = checked_instant("--event-occurred-at", args.event_occurred_at)
    async with budget_tables(settings, tables=_TABLES) as connection:
        event = await _stored_event(connection, tenant_id, gateway_request_id, hint)
        history = await event_history(connection, event)
    answer = EventHistoryAnswer.model_validate(history).model_dump(mode="json")
    if args.json:
        print(json.dumps(answer), file=out)
    else:
        print(describe_history(answer), file=out)


def describe_history(answer: dict[str, Any]) -> str:
    """The event's stored and effective values side by side, then its corrections."""
    event, effective = answer["event"], answer["effective"]
    lines = [
        f"event {event['gateway_request_id']!r} of tenant {event['tenant_id']!r}, occurred "
        f"{event['occurred_at']}, stored {event['received_at']}"
        + (", VOIDED" if answer["voided"] else "")
    ]
    rows = [
        [name, _cell(event[name]), _cell(effective[name])] for name in effective if name != "voided"
    ]
    lines.append(aligned_table(["FIELD", "STORED", "EFFECTIVE"], rows, right=set()))
    if answer["corrections"]:
        lines.append("corrections, oldest first:")
        rows = [
            [
                each["occurred_at"],
                each["correction_id"],
                each["action"],
                each["verdict"] + (", won" if each["won"] else ""),
                each["actor"],
                each["reason"],
            ]
            for each in answer["corrections"]
        ]
        headers = ["OCCURRED_AT", "CORRECTION_ID", "ACTION", "VERDICT", "ACTOR", "REASON"]
        lines.append(aligned_table(headers, rows, right=set()))
    else:
        lines.append("no corrections")
    if answer["waiting"]:
        lines.append("a correction of it is published and waits to be applied")
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


async def events_correct(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    from llm_usage.schemas.correction_request import (  # noqa: PLC0415 - when a command runs
        CorrectionAsked,
    )

    gateway_request_id = checked_request_id(args.gateway_request_id)
    tenant_id = None if args.tenant is None else checked_tenant(args.tenant)
    hint = checked_instant("--event-occurred-at", args.event_occurred_at)
    now = worker_clock()()
    asked = CorrectionAsked(
        action=args.events_command,
        changes=asked_changes(args) if args.events_command == "amend" else {},
        reason=args.reason,
        actor=default_actor_at_host() if args.actor is None else args.actor,
        occurred_at=checked_instant("--occurred-at", args.occurred_at) or now,
        correction_id=str(uuid.uuid4()) if args.correction_id is None else args.correction_id,
    )
    event, published = await publish_asked_correction(
        settings,
        asked,
        tenant_id=tenant_id,
        gateway_request_id=gateway_request_id,
        hint=hint,
        now=now,
    )
    if args.json:
        print(json.dumps({"correction_id": asked.correction_id, "event": published}), file=out)
    else:
        print(
            f"published correction {asked.correction_id} ({asked.action} of "
            f"{gateway_request_id!r} of tenant {event.tenant_id!r}) to {settings.usage_topic}; "
            f"`llm-usage events show --id {gateway_request_id} --tenant {event.tenant_id}` "
            "shows it once applied",
            file=out,
        )


async def publish_asked_correction(
    settings: Settings,
    asked: CorrectionAsked,
    *,
    tenant_id: str | None,
    gateway_request_id: str,
    hint: datetime | None,
    now: datetime,
) -> tuple[StoredUsageEvent, dict[str, Any]]:
    """Find the stored event (`tenant_id` None: the id window's), fill the correction from its
    current effective values, publish it and wait for the ack; the event and what was
    published. What `events void|amend` does, and the demo with it."""
    from llm_usage.schemas.correction_request import (  # noqa: PLC0415 - when a command runs
        EventKey,
        InvalidCorrectionError,
        correction_event,
    )
    from llm_usage.storage.event_history import effective_values  # noqa: PLC0415

    async with budget_tables(settings, tables=_TABLES) as connection:
        event = await _stored_event(connection, tenant_id, gateway_request_id, hint)
        current = await effective_values(connection, event)
    key = EventKey(event.tenant_id, event.gateway_request_id, event.occurred_at)
    try:
        published, value = correction_event(asked, event=key, current=current, now=now)
    except InvalidCorrectionError as error:
        raise ConfigurationError(_flag_error(error)) from None
    await publish_correction(settings, event.tenant_id, value, correction_id=asked.correction_id)
    return event, published


def _flag_error(error: InvalidCorrectionError) -> str:
    """The problem, named by the flag at fault."""
    field = (error.field or "").removeprefix("fields.")
    return f"{FLAGS[field]} {error.problem}" if field in FLAGS else str(error)


async def publish_correction(
    settings: Settings, tenant_id: str, value: bytes, *, correction_id: str
) -> None:
    """On the usage topic, keyed by tenant; returns once the brokers acknowledged it."""
    from aiokafka.errors import KafkaError  # noqa: PLC0415 - Kafka's stack, when run

    from llm_usage.kafka.clients import new_producer, start_client  # noqa: PLC0415

    producer = new_producer(settings)
    await start_client(producer, settings)
    try:
        metadata = await producer.client.fetch_all_metadata()
        if settings.usage_topic not in metadata.topics():
            raise UserFacingError(
                f"topic {settings.usage_topic} does not exist on the broker; create it with "
                "`llm-usage topics ensure` (or fix USAGE_TOPIC); nothing was published"
            )
        delivery = await producer.send(settings.usage_topic, value=value, key=tenant_id.encode())
        await delivery
    except KafkaError as error:
        raise ServiceUnreachableError(
            f"could not publish the correction to {settings.usage_topic} "
            f"({type(error).__name__}: {error}); run the command again with --correction-id "
            f"{correction_id} (a repeat of it is harmless)"
        ) from None
    finally:
        await producer.stop()


async def run_events_command(args: argparse.Namespace, settings: Settings) -> None:
    """`llm-usage events <action>`, printing to stdout."""
    action = events_show if args.events_command == "show" else events_correct
    await action(settings, args, sys.stdout)


def _words(name: str, prefix: str) -> str:
    return f"{prefix} {name.removesuffix('_id').replace('_', ' ')}"


def add_parser(commands: Commands) -> None:
    """`events void|amend|show`: every mistake in their arguments is one line and exit 2."""
    events = commands.add_parser(
        "events", help="stored usage events: show one with its corrections, void or amend it"
    )
    events.set_defaults(run=run_events_command)
    actions = events.add_subparsers(
        dest="events_command",
        required=True,
        metavar="ACTION",
        parser_class=OneLineArgumentParser,
    )
    void = actions.add_parser("void", help="publish a correction: the event counts for nothing")
    amend = actions.add_parser(
        "amend", help="publish a correction of some fields (the others keep their values)"
    )
    show = actions.add_parser("show", help="the event, its effective values and corrections")
    for each in (void, amend, show):
        each.add_argument(
            "--id", required=True, metavar="ID", dest="gateway_request_id", help="the event's id"
        )
        each.add_argument(
            "--tenant", metavar="ID", help="the event's tenant [the id window's, if it has the id]"
        )
        each.add_argument(
            "--event-occurred-at",
            metavar="TIME",
            help="RFC 3339: the event's occurred_at, to find an event older than the id window "
            "quickly",
        )
        each.add_argument("--json", action="store_true", help="print JSON")
    for each in (void, amend):
        each.add_argument("--reason", required=True, metavar="TEXT", help="why, for the audit")
        each.add_argument(
            "--correction-id", metavar="ID", help="the correction's id (a repeat is harmless) [new]"
        )
        each.add_argument("--actor", metavar="NAME", help="who, for the audit [user@host]")
        each.add_argument(
            "--occurred-at",
            metavar="TIME",
            help="RFC 3339: the correction's own time, which decides the last one [now]",
        )
    for name in COUNT_FIELDS:
        amend.add_argument(
            FLAGS[name],
            type=non_negative_int,
            metavar="N",
            dest=name,
            help=_words(name, "the corrected"),
        )
    amend.add_argument("--charge-usd", metavar="X", help="the exact charge, a decimal")
    amend.add_argument(
        "--charge-cents",
        type=non_negative_int,
        metavar="N",
        help="the gateway's own rounding of it",
    )
    for name, noun in ATTRIBUTIONS.items():
        choice = amend.add_mutually_exclusive_group()
        choice.add_argument(FLAGS[name], metavar="ID", dest=name, help=_words(name, "the new"))
        choice.add_argument(f"--no-{noun}", action="store_true", help=f"the event has no {noun}")
