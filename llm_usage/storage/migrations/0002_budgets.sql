-- Budget policies, the spend counters the budget consumer keeps, and the alerts it emits.

-- One policy per tenant and scope; `policy set` replaces it whole.
CREATE TABLE budget_policies (
    tenant_id          text        NOT NULL,
    scope_type         text        NOT NULL
        CHECK (scope_type IN ('tenant', 'deployment', 'user', 'agent')),
    scope_id           text        NOT NULL,
    daily_limit_usd    numeric              CHECK (daily_limit_usd > 0),
    monthly_limit_usd  numeric              CHECK (monthly_limit_usd > 0),
    warn_threshold_pct integer     NOT NULL DEFAULT 80
        CHECK (warn_threshold_pct BETWEEN 1 AND 99),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, scope_type, scope_id),
    CHECK (daily_limit_usd IS NOT NULL OR monthly_limit_usd IS NOT NULL),
    CHECK (scope_type <> 'tenant' OR scope_id = tenant_id)
);

-- Every change of a policy: when, who, and the policy before and after (null when absent).
CREATE TABLE budget_policy_audit (
    id          bigserial   PRIMARY KEY,
    tenant_id   text        NOT NULL,
    scope_type  text        NOT NULL,
    scope_id    text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    old_policy  jsonb,
    new_policy  jsonb
);
CREATE INDEX budget_policy_audit_tenant ON budget_policy_audit (tenant_id, changed_at);

-- The gateway_request_ids the budget consumer has counted, so that a redelivery counts nothing.
-- Pruned after the usage topic's retention plus a margin: nothing older can be redelivered.
CREATE TABLE budget_counted_events (
    gateway_request_id text        NOT NULL PRIMARY KEY,
    counted_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budget_counted_events_counted_at ON budget_counted_events (counted_at);

-- Exact spend per scope and period, for every scope an event touches (policy or not).
CREATE TABLE budget_spend (
    tenant_id    text    NOT NULL,
    scope_type   text    NOT NULL,
    scope_id     text    NOT NULL,
    "window"     text    NOT NULL CHECK ("window" IN ('daily', 'monthly')),
    period_start date    NOT NULL,
    spend_usd    numeric NOT NULL CHECK (spend_usd >= 0),
    PRIMARY KEY (tenant_id, scope_type, scope_id, "window", period_start)
);

-- Alerts decided in the same transaction as the spend that crossed them (transactional outbox);
-- the relay publishes them to the alerts topic and marks them. The alert key is unique: each
-- (tenant, scope, window, period, level, limit) alerts at most once, ever.
CREATE TABLE budget_alert_outbox (
    seq           bigserial   PRIMARY KEY,
    alert_id      text        NOT NULL UNIQUE,
    tenant_id     text        NOT NULL,
    scope_type    text        NOT NULL,
    scope_id      text        NOT NULL,
    "window"      text        NOT NULL,
    period_start  date        NOT NULL,
    level         text        NOT NULL CHECK (level IN ('warning', 'exceeded')),
    limit_usd     numeric     NOT NULL,
    payload       text        NOT NULL,  -- the exact JSON published, byte for byte on a retry
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    UNIQUE (tenant_id, scope_type, scope_id, "window", period_start, level, limit_usd)
);
CREATE INDEX budget_alert_outbox_unpublished ON budget_alert_outbox (seq)
    WHERE published_at IS NULL;
CREATE INDEX budget_alert_outbox_tenant ON budget_alert_outbox (tenant_id, created_at);

-- Where the relay's last acknowledged publish ended, per alerts-topic partition: a relay taking
-- over reads the topic from here and marks what a crashed one published but did not mark.
CREATE TABLE budget_alert_relay_positions (
    topic       text   NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
