-- Exact usage per tenant, UTC day, attribute and value, kept by the usage consumer in the
-- transaction that stores the events (after `usage_daily_totals`, under the same month locks):
-- the API's summary, breakdowns and daily series read these rows instead of every event, so a
-- report's cost no longer grows with how many events a tenant sends (issue 21).
-- Each event adds to exactly one row of each dimension: the one of its value for that attribute
-- (null is a value of its own). So the `deployment` rows of a day sum to the day's whole usage.
-- Key order (tenant, dimension, day, key): a report reads one tenant's dimension over a range of
-- days, a contiguous stretch of the index. NULLS NOT DISTINCT as usage_daily_totals: one row for
-- the events without a value.
CREATE TABLE usage_daily_dimensions (
    tenant_id            text    NOT NULL,
    dimension            text    NOT NULL CHECK (dimension IN (
                             'deployment', 'model', 'provider', 'user', 'agent', 'channel',
                             'feature')),
    day                  date    NOT NULL,
    key                  text,
    requests             bigint  NOT NULL CHECK (requests >= 0),
    input_tokens         bigint  NOT NULL CHECK (input_tokens >= 0),
    output_tokens        bigint  NOT NULL CHECK (output_tokens >= 0),
    cached_input_tokens  bigint  NOT NULL CHECK (cached_input_tokens >= 0),
    reasoning_tokens     bigint  NOT NULL CHECK (reasoning_tokens >= 0),
    total_tokens         bigint  NOT NULL CHECK (total_tokens >= 0),
    charge_usd           numeric NOT NULL CHECK (charge_usd >= 0),
    CONSTRAINT usage_daily_dimensions_key
        UNIQUE NULLS NOT DISTINCT (tenant_id, dimension, day, key)
);
-- Every batch adds to the rows of its days: no indexed column changes, so at fillfactor 50 the
-- updates stay HOT, as usage_daily_totals (migration 0010) and budget_spend (0007).
ALTER TABLE usage_daily_dimensions SET (fillfactor = 50);

-- Events stored before this migration (storage/usage_dimensions.py fills the same way).
INSERT INTO usage_daily_dimensions AS d
    (tenant_id, dimension, day, key, requests, input_tokens, output_tokens,
     cached_input_tokens, reasoning_tokens, total_tokens, charge_usd)
SELECT e.tenant_id, v.dimension, (e.occurred_at AT TIME ZONE 'UTC')::date, v.key, count(*),
       sum(e.input_tokens), sum(e.output_tokens), sum(e.cached_input_tokens),
       sum(e.reasoning_tokens), sum(e.total_tokens), sum(e.customer_charge_usd)
FROM llm_usage_events AS e
CROSS JOIN LATERAL (VALUES
    ('deployment', e.deployment_id), ('model', e.model), ('provider', e.provider),
    ('user', e.user_id), ('agent', e.agent_id), ('channel', e.channel), ('feature', e.feature)
) AS v(dimension, key)
GROUP BY e.tenant_id, v.dimension, (e.occurred_at AT TIME ZONE 'UTC')::date, v.key;

-- The usage consumer adds to the rows; the API reads them.
GRANT SELECT, INSERT, UPDATE ON usage_daily_dimensions TO llm_usage_worker;
