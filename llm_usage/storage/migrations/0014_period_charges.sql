-- Period charges (`llm_period_charge_recorded`): the gateway's authoritative charge for a
-- plan-inclusive tenant's month, stored once per (tenant, id) by the usage consumer in the
-- transaction of its batch. Rows are never changed: a later charge for the same tenant,
-- deployment and period (by occurred_at, then period_charge_id) supersedes an earlier one when
-- the rollup reads them. The key holds tenant_id: the table is distributed on it under Citus.
CREATE TABLE period_charges (
    tenant_id          text        NOT NULL,
    period_charge_id   text        NOT NULL,
    deployment_id      text,
    period             text        NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    period_charge_usd  numeric     NOT NULL CHECK (period_charge_usd >= 0),
    occurred_at        timestamptz NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period_charge_id)
);
-- The rollup reads a month's charges (of some tenants).
CREATE INDEX period_charges_by_period ON period_charges (period, tenant_id);

-- A plan-inclusive month bills its usage line plus a true-up to the period charge.
ALTER TABLE invoice_lines DROP CONSTRAINT IF EXISTS invoice_lines_kind_check;
ALTER TABLE invoice_lines ADD CONSTRAINT invoice_lines_kind_check
    CHECK (kind IN ('llm_usage', 'llm_usage_adjustment', 'llm_usage_plan_true_up'));

-- The usage consumer stores them; the rollup reads them.
GRANT SELECT, INSERT ON period_charges TO llm_usage_worker;
