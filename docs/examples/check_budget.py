"""Ask the pipeline before an LLM request whether the tenant's budget allows it, the way a gateway
should: a short timeout, one retry with the same gateway_request_id, and a chosen behaviour when
the check cannot be reached (fail open or fail closed). Standard library only.

    python docs/examples/check_budget.py --tenant acme --charge 0.25 --user user-42

Flags (each defaults to the environment variable named):

    --url      LLM_USAGE_API_URL     http://localhost:8080
    --token    LLM_USAGE_API_TOKEN   a JWT with role `gateway`
    --id       a new id; reuse the request's own id, and publish its usage event with it
    --timeout  seconds per attempt (0.5)
    --fail-open | --fail-closed (default) when the check does not answer

Prints one line per answer and exits 0 for allow, 1 for deny, 2 for a refused request (a bad token
or body: fix it, it is not an outage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from typing import Any

ALLOW, DENY, REFUSED = 0, 1, 2


class CheckUnavailableError(Exception):
    """The check did not answer (timeout, connection refused, 5xx): decide by the fallback."""


def check_once(url: str, token: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own API
        url.rstrip("/") + "/v1/budget-checks",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - our API
            # Money stays exact: read numbers as Decimal (the API sends strings anyway).
            return json.loads(answer.read(), parse_float=Decimal)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        if error.code >= 500:  # 503: try again with the same id
            raise CheckUnavailableError(f"HTTP {error.code}: {detail}") from None
        raise
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise CheckUnavailableError(str(getattr(error, "reason", error))) from None


def check(url: str, token: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The answer, retrying once with the same id (a repeat never holds twice)."""
    try:
        return check_once(url, token, body, timeout)
    except CheckUnavailableError:
        return check_once(url, token, body, timeout)


def describe(request_id: str, answer: dict[str, Any]) -> str:
    if answer["decision"] == "allow":
        if answer["hold_expires_at"] is None:
            return f"allow {request_id}: already counted, nothing held"
        return (
            f"allow {request_id}: held {Decimal(answer['estimated_charge_usd'])} USD "
            f"until {answer['hold_expires_at']}"
        )
    limits = "; ".join(
        f"{limit['scope_type']} {limit['scope_id']} {limit['window']} limit "
        f"{Decimal(limit['limit_usd'])} USD (spend {Decimal(limit['spend_usd'])}, "
        f"held {Decimal(limit['held_usd'])})"
        for limit in answer["denied_by"]
    )
    return f"deny {request_id}: {Decimal(answer['estimated_charge_usd'])} USD over {limits}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("LLM_USAGE_API_URL", "http://localhost:8080")
    )
    parser.add_argument("--token", default=os.environ.get("LLM_USAGE_API_TOKEN", ""))
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--charge", required=True, help="the estimate in USD, e.g. 0.25")
    parser.add_argument("--id", default=f"req-{uuid.uuid4()}")
    parser.add_argument("--deployment")
    parser.add_argument("--user")
    parser.add_argument("--agent")
    parser.add_argument("--timeout", type=float, default=0.5)
    fallback = parser.add_mutually_exclusive_group()
    fallback.add_argument("--fail-open", dest="fail_open", action="store_true")
    fallback.add_argument("--fail-closed", dest="fail_open", action="store_false")
    args = parser.parse_args()

    body = {
        "gateway_request_id": args.id,
        "tenant_id": args.tenant,
        "deployment_id": args.deployment,
        "user_id": args.user,
        "agent_id": args.agent,
        "estimated_charge_usd": str(Decimal(args.charge)),  # a string: every digit kept
    }
    try:
        answer = check(args.url, args.token, body, args.timeout)
    except CheckUnavailableError as why:
        # Fail open: the request runs unheld (still counted and alerted, outside the limit's
        # guarantee). Fail closed: paying traffic is refused while the check is down.
        if args.fail_open:
            print(f"allow {args.id}: budget check unavailable ({why}); failing open")
            return ALLOW
        print(f"deny {args.id}: budget check unavailable ({why}); failing closed")
        return DENY
    except urllib.error.HTTPError as error:
        print(f"refused {args.id}: HTTP {error.code}: {error.read().decode(errors='replace')}")
        return REFUSED
    print(describe(args.id, answer))
    return ALLOW if answer["decision"] == "allow" else DENY


if __name__ == "__main__":
    sys.exit(main())
