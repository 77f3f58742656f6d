-- One row per accepted usage event; finance and reporting read this table (see CONTRACT.md).
CREATE TABLE llm_usage_events (
    gateway_request_id    text        NOT NULL PRIMARY KEY,
    tenant_id             text        NOT NULL,
    deployment_id         text,
    user_id               text,
    agent_id              text,
    channel               text,
    feature               text,
    provider              text,
    model                 text,
    request_kind          text,
    input_tokens          bigint      NOT NULL CHECK (input_tokens >= 0),
    output_tokens         bigint      NOT NULL CHECK (output_tokens >= 0),
    cached_input_tokens   bigint      NOT NULL CHECK (cached_input_tokens >= 0),
    reasoning_tokens      bigint      NOT NULL CHECK (reasoning_tokens >= 0),
    total_tokens          bigint      NOT NULL CHECK (total_tokens >= 0),
    -- Unconstrained numeric keeps the exact digits the gateway sent (no padding to a fixed scale).
    upstream_cost_usd     numeric              CHECK (upstream_cost_usd >= 0),
    customer_charge_usd   numeric     NOT NULL CHECK (customer_charge_usd >= 0),
    customer_charge_cents bigint               CHECK (customer_charge_cents >= 0),
    markup_mode           text,
    occurred_at           timestamptz NOT NULL,
    received_at           timestamptz NOT NULL DEFAULT now()
);

-- Reports and the rollup read a tenant's usage over a period, often per deployment.
CREATE INDEX llm_usage_events_tenant_occurred_at ON llm_usage_events (tenant_id, occurred_at);
CREATE INDEX llm_usage_events_deployment_occurred_at
    ON llm_usage_events (tenant_id, deployment_id, occurred_at);
