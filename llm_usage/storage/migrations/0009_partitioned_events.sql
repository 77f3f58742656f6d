-- Step 2 of 2: llm_usage_events becomes partitioned by UTC month of occurred_at, with no DEFAULT
-- partition (DETACH ... CONCURRENTLY needs that). A brief exclusive lock: the old table is
-- renamed and attached whole as the partition of everything before its cut-over (0008), its
-- Tier 1 index adopted as is; an empty one (a new database) is dropped instead. The monthly
-- partitions themselves are created by `llm-usage migrate` and `llm-usage maintain`.
LOCK TABLE llm_usage_events, budget_counted_events IN ACCESS EXCLUSIVE MODE;

-- The ids the previous release stored (and counted) since 0008's back-fill started: nothing can
-- be written meanwhile now. A margin covers its batches that were open across that moment.
SELECT usage_event_ids_backfill(
    (SELECT backfilled_from - interval '10 minutes' FROM usage_event_id_backfill));
DROP INDEX llm_usage_events_legacy_received_at;
DROP TABLE usage_event_id_backfill;
DROP FUNCTION usage_event_ids_backfill(timestamptz);

ALTER TABLE llm_usage_events RENAME TO llm_usage_events_legacy;
CREATE TABLE llm_usage_events (LIKE llm_usage_events_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (occurred_at);
ALTER TABLE llm_usage_events DROP CONSTRAINT llm_usage_events_before_cutover;
-- Tier 1, and the reports' covering index in one: an identical re-send meets its own entry,
-- inserted at the right edge of its tenant's range, never at a random place.
CREATE UNIQUE INDEX llm_usage_events_identity
    ON llm_usage_events (tenant_id, occurred_at, gateway_request_id)
    INCLUDE (customer_charge_usd, input_tokens, output_tokens, cached_input_tokens,
             reasoning_tokens, total_tokens, deployment_id, model, provider, user_id,
             agent_id, channel, feature);

DO $$
DECLARE
    cutover date := (SELECT ends FROM usage_event_months WHERE month = '-infinity');
BEGIN
    IF NOT EXISTS (SELECT FROM llm_usage_events_legacy) THEN
        DROP TABLE llm_usage_events_legacy;
        DELETE FROM usage_event_months WHERE month = '-infinity';
    ELSE
        -- The old id key and covering index: Tier 1 (adopted below) does both jobs now.
        ALTER TABLE llm_usage_events_legacy DROP CONSTRAINT llm_usage_events_pkey;
        DROP INDEX IF EXISTS llm_usage_events_tenant_occurred_at;
        EXECUTE format(
            'ALTER TABLE llm_usage_events ATTACH PARTITION llm_usage_events_legacy '
            'FOR VALUES FROM (MINVALUE) TO (%L)', cutover::timestamp AT TIME ZONE 'UTC');
    END IF;
END
$$;

-- The budget consumer's own id table gives way to the shared window. Ids it counted before the
-- window existed stay readable (the consumer skips them) until they are older than the window;
-- `llm-usage maintain` empties it then.
ALTER TABLE budget_counted_events RENAME TO budget_counted_legacy;

GRANT SELECT, INSERT ON llm_usage_events TO llm_usage_worker;
GRANT SELECT ON budget_counted_legacy TO llm_usage_worker;
REVOKE INSERT, DELETE ON budget_counted_legacy FROM llm_usage_worker;
