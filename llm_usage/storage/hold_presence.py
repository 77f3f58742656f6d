"""Whether any budget-check hold is open at all: the budget consumer sends a batch's newly
counted ids to be released only then (design §4, "Cost on the hot path"). Sending 20,000 ids
costs the batch ~40 ms of encoding and transfer; this probe, on the partial index of open
holds, well under 1 ms. A hold committed after the probe by a check that raced the batch is the
race of design §5.1: the sweeper settles it."""

from __future__ import annotations

from llm_usage.storage.pool import Connection

# Not `SELECT EXISTS (SELECT FROM …)`: Citus refuses a subquery with no column.
_ANY_OPEN = "SELECT 1 FROM budget_holds WHERE state = 'open' LIMIT 1"


async def any_open_hold(connection: Connection) -> bool:
    """Whether some tenant has an open hold (in this transaction's view)."""
    return await connection.fetchval(_ANY_OPEN) is not None
