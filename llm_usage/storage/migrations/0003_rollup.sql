-- The rollup's exact pre-aggregate, invoice lines, and closed months.

-- Exact usage per tenant, deployment (null is its own) and UTC day, kept by the usage consumer
-- in the same transaction as the events it stores: a month's rollup reads ~30 rows per
-- deployment instead of every event. `updated_at` (the statement's clock, not the transaction
-- start) tells the rollup which closed months have received late events.
CREATE TABLE usage_daily_totals (
    tenant_id      text        NOT NULL,
    deployment_id  text,
    day            date        NOT NULL,
    charge_usd     numeric     NOT NULL CHECK (charge_usd >= 0),
    input_tokens   bigint      NOT NULL CHECK (input_tokens >= 0),
    output_tokens  bigint      NOT NULL CHECK (output_tokens >= 0),
    requests       bigint      NOT NULL CHECK (requests >= 0),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT usage_daily_totals_key UNIQUE NULLS NOT DISTINCT (tenant_id, deployment_id, day)
);
CREATE INDEX usage_daily_totals_day ON usage_daily_totals (day, updated_at);

-- Events stored before this migration.
INSERT INTO usage_daily_totals
    (tenant_id, deployment_id, day, charge_usd, input_tokens, output_tokens, requests)
SELECT tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date,
       sum(customer_charge_usd), sum(input_tokens), sum(output_tokens), count(*)
FROM llm_usage_events
GROUP BY tenant_id, deployment_id, (occurred_at AT TIME ZONE 'UTC')::date;

-- A closed month: its lines are final. Never reopened.
CREATE TABLE invoice_periods (
    period    text        NOT NULL PRIMARY KEY CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    closed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE invoice_lines (
    id               bigserial   PRIMARY KEY,
    tenant_id        text        NOT NULL,
    period           text        NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    deployment_id    text,
    kind             text        NOT NULL CHECK (kind IN ('llm_usage', 'llm_usage_adjustment')),
    resource_kind    text        NOT NULL,
    unit             text        NOT NULL,
    unit_price_cents bigint,
    qty              bigint      NOT NULL,
    amount_cents     bigint      NOT NULL,
    description      text        NOT NULL,
    meta             jsonb       NOT NULL,
    original_period  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT invoice_lines_one_per_key
        UNIQUE NULLS NOT DISTINCT (tenant_id, period, deployment_id, kind, original_period)
);
CREATE INDEX invoice_lines_billing ON invoice_lines (tenant_id, deployment_id, original_period);

-- Closed months are final in the database itself, whatever the code does: no line of a closed
-- month may be added, changed or removed, and a month cannot be reopened.
CREATE FUNCTION invoice_lines_frozen_once_closed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE')
       AND EXISTS (SELECT 1 FROM invoice_periods WHERE period = OLD.period) THEN
        RAISE EXCEPTION 'invoice lines of the closed month % are final', OLD.period
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE')
       AND EXISTS (SELECT 1 FROM invoice_periods WHERE period = NEW.period) THEN
        RAISE EXCEPTION 'invoice lines of the closed month % are final', NEW.period
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
CREATE TRIGGER invoice_lines_frozen_once_closed
    BEFORE INSERT OR UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION invoice_lines_frozen_once_closed();
-- TRUNCATE bypasses row triggers: refuse it outright on a table finance relies on.
CREATE FUNCTION invoice_lines_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'invoice_lines cannot be truncated: closed months are final'
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_lines_no_truncate();

CREATE FUNCTION invoice_periods_never_reopened() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the closed month % cannot be reopened or changed', OLD.period
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER invoice_periods_never_reopened BEFORE UPDATE OR DELETE ON invoice_periods
    FOR EACH ROW EXECUTE FUNCTION invoice_periods_never_reopened();
