-- migrate: outside a transaction
-- Step 1 of 2 of the move to monthly partitions and a two-tier identity (docs/storage.md).
-- Everything here can run on a live, large llm_usage_events while the consumers write to it:
-- each statement commits on its own, the index is built CONCURRENTLY and the constraint is
-- validated under a lock that does not block writes. Every statement is safe to run again.

-- Tier 2: every id seen in the last DEDUP_WINDOW_HOURS, with the fields that tell a duplicate
-- from a conflict. Both consumers decide "first copy" here: the usage consumer inserts the row
-- when it stores the event, the budget consumer inserts it or sets `counted` when it counts it.
-- Keyed on the id alone (unique whatever the tenant or time); hash slices are pruned one by one.
CREATE TABLE IF NOT EXISTS usage_event_ids (
    gateway_request_id  text        NOT NULL,
    tenant_id           text        NOT NULL,
    deployment_id       text,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    cached_input_tokens bigint      NOT NULL,
    reasoning_tokens    bigint      NOT NULL,
    total_tokens        bigint      NOT NULL,
    customer_charge_usd numeric     NOT NULL,
    occurred_at         timestamptz NOT NULL,
    first_seen_at       timestamptz NOT NULL DEFAULT now(),
    counted             boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (gateway_request_id)
) PARTITION BY HASH (gateway_request_id);
DO $$
BEGIN
    FOR part IN 0..15 LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_event_ids '
            'FOR VALUES WITH (MODULUS 16, REMAINDER %s) WITH (fillfactor = 80)',
            'usage_event_ids_p' || lpad(part::text, 2, '0'), part);
    END LOOP;
END
$$;

-- The months of llm_usage_events: [month, ends) per partition, and where each is in its life.
-- The oldest attached month is the retention floor: an event before it is dead-lettered
-- `expired`. The partition made of the table as it was before this migration is the month
-- '-infinity' (it holds everything before `ends`).
CREATE TABLE IF NOT EXISTS usage_event_months (
    month      date        NOT NULL PRIMARY KEY,
    ends       date        NOT NULL,
    state      text        NOT NULL DEFAULT 'attached'
        CHECK (state IN ('attached', 'detaching', 'detached', 'archived', 'dropped')),
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- Tier 1 on the existing table, built without blocking writes; the partitioned table adopts it
-- when the old table becomes its first partition (0009). A build interrupted earlier leaves an
-- invalid index behind: drop it so that this one is built again.
DO $$
BEGIN
    IF EXISTS (
        SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = 'llm_usage_events_legacy_identity' AND NOT i.indisvalid
    ) THEN
        DROP INDEX llm_usage_events_legacy_identity;
    END IF;
END
$$;
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS llm_usage_events_legacy_identity
    ON llm_usage_events (tenant_id, occurred_at, gateway_request_id)
    INCLUDE (customer_charge_usd, input_tokens, output_tokens, cached_input_tokens,
             reasoning_tokens, total_tokens, deployment_id, model, provider, user_id,
             agent_id, channel, feature);

-- The old table will hold every event before the month after next (a month's margin for a
-- large table whose checks take long); a validated CHECK lets ATTACH skip its own scan.
DO $$
DECLARE
    -- The migrating worker's today (llm_usage.today, set by `llm-usage migrate`): its clock.
    cutover date := (date_trunc('month', current_setting('llm_usage.today')::date)
                     + interval '2 months')::date;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'llm_usage_events'::regclass) = 'r'
       AND NOT EXISTS (SELECT FROM usage_event_months WHERE month = '-infinity') THEN
        INSERT INTO usage_event_months (month, ends) VALUES ('-infinity', cutover);
        EXECUTE format(
            'ALTER TABLE llm_usage_events ADD CONSTRAINT llm_usage_events_before_cutover '
            'CHECK (occurred_at < %L) NOT VALID', cutover::timestamp AT TIME ZONE 'UTC');
    END IF;
END
$$;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_constraint WHERE conname = 'llm_usage_events_before_cutover'
               AND NOT convalidated) THEN
        ALTER TABLE llm_usage_events VALIDATE CONSTRAINT llm_usage_events_before_cutover;
    END IF;
END
$$;

-- The window starts with the ids stored within it, counted by the budget consumer or not, found
-- through an index on received_at built for this (0009 drops it). The previous release may
-- still be writing meanwhile: `backfilled_from` records where this pass started, and 0009, under
-- its lock, adds what was stored since (with a margin for transactions open across it).
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_usage_events_legacy_received_at
    ON llm_usage_events (received_at);
CREATE TABLE IF NOT EXISTS usage_event_id_backfill (
    backfilled_from timestamptz NOT NULL
);
INSERT INTO usage_event_id_backfill (backfilled_from)
SELECT now() WHERE NOT EXISTS (SELECT FROM usage_event_id_backfill);
CREATE OR REPLACE FUNCTION usage_event_ids_backfill(since timestamptz) RETURNS bigint
LANGUAGE sql AS $$
    WITH added AS (
        INSERT INTO usage_event_ids (gateway_request_id, tenant_id, deployment_id,
            input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, total_tokens,
            customer_charge_usd, occurred_at, first_seen_at, counted)
        SELECT e.gateway_request_id, e.tenant_id, e.deployment_id, e.input_tokens,
            e.output_tokens, e.cached_input_tokens, e.reasoning_tokens, e.total_tokens,
            e.customer_charge_usd, e.occurred_at, e.received_at,
            EXISTS (SELECT FROM budget_counted_events c
                    WHERE c.gateway_request_id = e.gateway_request_id)
        FROM llm_usage_events e
        WHERE e.received_at >= since
        ON CONFLICT (gateway_request_id) DO UPDATE SET counted = EXCLUDED.counted
            WHERE EXCLUDED.counted AND NOT usage_event_ids.counted
        RETURNING 1
    )
    SELECT count(*) FROM added
$$;
SELECT usage_event_ids_backfill(
    now() - make_interval(hours => current_setting('llm_usage.dedup_window_hours')::integer));

GRANT SELECT, INSERT, UPDATE ON usage_event_ids TO llm_usage_worker;
GRANT SELECT ON usage_event_months TO llm_usage_worker;
