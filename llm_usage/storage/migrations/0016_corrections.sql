-- Issue 24: corrections of stored usage (llm_usage_corrected), never editing the stored rows.
-- Each correction is kept as history; the effective values of a corrected event are kept beside
-- it; the derived numbers (daily aggregates, budget counters) are moved by the difference in the
-- transaction that applies the correction.

-- On Citus, run on one connection per worker, as 0015 (a placeholder setting elsewhere).
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- Every correction the usage consumer judged: `applied` (its event was stored; it is part of the
-- event's history), or `unknown` (no event within CORRECTION_WAIT_SECONDS: dead-lettered; a DLQ
-- replay of it may still apply it later, replacing this row). Keyed per tenant, like the event.
CREATE TABLE IF NOT EXISTS usage_corrections (
    tenant_id           text        NOT NULL,
    correction_id       text        NOT NULL,
    gateway_request_id  text        NOT NULL,
    action              text        NOT NULL CONSTRAINT usage_corrections_action
        CHECK (action IN ('void', 'amend')),
    fields              jsonb       NOT NULL DEFAULT '{}',  -- as sent; money as exact strings
    reason              text        NOT NULL,
    actor               text        NOT NULL,
    occurred_at         timestamptz NOT NULL,               -- the correction's: decides "last"
    event_occurred_at   timestamptz,                        -- the event's, once found
    received_at         timestamptz NOT NULL DEFAULT now(),
    verdict             text        NOT NULL CONSTRAINT usage_corrections_verdict
        CHECK (verdict IN ('applied', 'unknown')),
    won                 boolean     NOT NULL DEFAULT false, -- it was the winner when applied
    late                boolean     NOT NULL DEFAULT false, -- the event's month was closed then
    from_deployment_id  text,                               -- effective deployment before
    to_deployment_id    text,                               -- and after (the lines it moves)
    charge_delta_usd    numeric,                            -- effective charge after - before
    billed_in           text,                               -- month whose closed lines trued it up
    PRIMARY KEY (tenant_id, correction_id)
);
CREATE INDEX IF NOT EXISTS usage_corrections_event
    ON usage_corrections (tenant_id, gateway_request_id);
CREATE INDEX IF NOT EXISTS usage_corrections_unbilled
    ON usage_corrections (tenant_id, event_occurred_at) WHERE late AND billed_in IS NULL;

-- The effective values of each corrected event (an uncorrected event has no row), keyed as the
-- event (Tier 1), so that the event pages and reconcile join it on that key.
CREATE TABLE IF NOT EXISTS usage_event_effective (
    tenant_id             text        NOT NULL,
    occurred_at           timestamptz NOT NULL,
    gateway_request_id    text        NOT NULL,
    winner_occurred_at    timestamptz NOT NULL,
    winner_id             text        NOT NULL,
    voided                boolean     NOT NULL,
    deployment_id         text,
    user_id               text,
    agent_id              text,
    input_tokens          bigint      NOT NULL,
    output_tokens         bigint      NOT NULL,
    cached_input_tokens   bigint      NOT NULL,
    reasoning_tokens      bigint      NOT NULL,
    total_tokens          bigint      NOT NULL,
    customer_charge_usd   numeric     NOT NULL,
    customer_charge_cents bigint,
    charge_estimated      boolean     NOT NULL,
    corrections           integer     NOT NULL,             -- applied so far
    PRIMARY KEY (tenant_id, occurred_at, gateway_request_id)
);

-- Corrections waiting for their event (or, for the budget consumer, for the usage consumer's
-- verdict and the event's count), with the record byte for byte: the usage consumer
-- dead-letters it from here when the wait ends.
CREATE TABLE IF NOT EXISTS correction_waits (
    consumer           text        NOT NULL CONSTRAINT correction_waits_consumer
        CHECK (consumer IN ('usage', 'budget')),
    tenant_id          text        NOT NULL,
    correction_id      text        NOT NULL,
    gateway_request_id text        NOT NULL,
    record_topic       text        NOT NULL,
    record_partition   integer     NOT NULL,
    record_offset      bigint      NOT NULL,
    record_key         bytea,
    record_value       bytea       NOT NULL,
    first_seen_at      timestamptz NOT NULL,
    wait_until         timestamptz NOT NULL,
    tries              integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, tenant_id, correction_id)
);
CREATE INDEX IF NOT EXISTS correction_waits_due ON correction_waits (consumer, first_seen_at);

-- What the budget consumer applied: its idempotency record (the fields are in usage_corrections).
CREATE TABLE IF NOT EXISTS budget_corrections (
    tenant_id          text        NOT NULL,
    correction_id      text        NOT NULL,
    gateway_request_id text        NOT NULL,
    applied_at         timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, correction_id)
);
CREATE INDEX IF NOT EXISTS budget_corrections_event
    ON budget_corrections (tenant_id, gateway_request_id);

-- Finance's view: every stored event with its corrections applied (`voided` events contribute
-- nothing; `corrected` says whether any correction applies). Reconcile reads the same view.
CREATE OR REPLACE VIEW llm_usage_events_effective AS
SELECT e.gateway_request_id,
       e.tenant_id,
       CASE WHEN f.tenant_id IS NULL THEN e.deployment_id ELSE f.deployment_id END
           AS deployment_id,
       CASE WHEN f.tenant_id IS NULL THEN e.user_id ELSE f.user_id END AS user_id,
       CASE WHEN f.tenant_id IS NULL THEN e.agent_id ELSE f.agent_id END AS agent_id,
       e.channel,
       e.feature,
       e.provider,
       e.model,
       e.request_kind,
       coalesce(f.input_tokens, e.input_tokens) AS input_tokens,
       coalesce(f.output_tokens, e.output_tokens) AS output_tokens,
       coalesce(f.cached_input_tokens, e.cached_input_tokens) AS cached_input_tokens,
       coalesce(f.reasoning_tokens, e.reasoning_tokens) AS reasoning_tokens,
       coalesce(f.total_tokens, e.total_tokens) AS total_tokens,
       e.upstream_cost_usd,
       coalesce(f.customer_charge_usd, e.customer_charge_usd) AS customer_charge_usd,
       CASE WHEN f.tenant_id IS NULL THEN e.customer_charge_cents ELSE f.customer_charge_cents END
           AS customer_charge_cents,
       e.markup_mode,
       e.occurred_at,
       e.received_at,
       coalesce(f.charge_estimated, e.charge_estimated) AS charge_estimated,
       e.price_effective_from,
       coalesce(f.voided, false) AS voided,
       f.tenant_id IS NOT NULL AS corrected
FROM llm_usage_events AS e
LEFT JOIN usage_event_effective AS f
    ON f.tenant_id = e.tenant_id
   AND f.occurred_at = e.occurred_at
   AND f.gateway_request_id = e.gateway_request_id;

GRANT SELECT, INSERT, UPDATE ON usage_corrections TO llm_usage_worker;  -- UPDATE: verdict, billed_in
GRANT SELECT, INSERT, UPDATE ON usage_event_effective TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON correction_waits TO llm_usage_worker;
GRANT SELECT, INSERT, DELETE ON budget_corrections TO llm_usage_worker;  -- DELETE: pruning
GRANT SELECT ON llm_usage_events_effective TO llm_usage_worker;
