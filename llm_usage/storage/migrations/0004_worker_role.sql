-- The role the workers and the API log in with (through a login user granted it): they read and
-- write what they need and nothing else. No DDL, no DELETE or UPDATE of stored usage events.
-- Run migrations as the schema owner; give each worker's login user this role:
--   CREATE ROLE llm_usage_app LOGIN PASSWORD '…' IN ROLE llm_usage_worker;
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'llm_usage_worker') THEN
        CREATE ROLE llm_usage_worker NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO llm_usage_worker;
GRANT SELECT ON schema_migrations TO llm_usage_worker;

-- Usage: stored once, never changed or removed by a worker.
GRANT SELECT, INSERT ON llm_usage_events TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE ON usage_daily_totals TO llm_usage_worker;

-- Budgets: counters and the outbox move; counted ids are pruned after the retention.
GRANT SELECT, INSERT, DELETE ON budget_counted_events TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE ON budget_spend TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE ON budget_alert_outbox TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE ON budget_alert_relay_positions TO llm_usage_worker;
-- Policies change through `llm-usage policy` and the API, each change audited (append only).
GRANT SELECT, INSERT, UPDATE, DELETE ON budget_policies TO llm_usage_worker;
GRANT SELECT, INSERT ON budget_policy_audit TO llm_usage_worker;

-- Invoices: an open month's lines are replaced by each run (closed months are frozen by
-- triggers whoever asks); a closed month is never reopened.
GRANT SELECT, INSERT, DELETE ON invoice_lines TO llm_usage_worker;
GRANT SELECT, INSERT ON invoice_periods TO llm_usage_worker;

GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO llm_usage_worker;
