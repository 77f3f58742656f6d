-- Late usage found from marks instead of by rescanning history, and budget periods prunable.

-- A tenant's usage landed on a day of a month that was already closed: the usage consumer writes
-- (or bumps) this mark in the transaction that adds the usage to `usage_daily_totals`, after
-- taking the month's shared advisory lock (the close of a month holds it exclusively, so a batch
-- either commits before the close reads the month or sees the month closed and marks it). The
-- rollup trues up the marked tenants' months in the first open month after them, on every run of
-- that month, and the close of that month deletes the marks it billed. `batches` counts the
-- batches that marked the row: the close deletes a mark only if no batch bumped it meanwhile.
CREATE TABLE usage_late_marks (
    tenant_id  text        NOT NULL,
    period     text        NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    marked_at  timestamptz NOT NULL DEFAULT now(),
    batches    bigint      NOT NULL DEFAULT 1,
    PRIMARY KEY (tenant_id, period)
);

-- What the previous release's late-usage search would still find: late usage stored before this
-- migration (with its one-hour margin). Marking a month that was trued up already costs one
-- recomputation that bills nothing. Safe to run again (docs/operations.md: once more after the
-- last usage consumer of the previous release has stopped, since those do not write marks).
INSERT INTO usage_late_marks (tenant_id, period)
SELECT DISTINCT t.tenant_id, p.period
FROM invoice_periods AS p
JOIN usage_daily_totals AS t
    ON t.day >= to_date(p.period, 'YYYY-MM')
   AND t.day < (to_date(p.period, 'YYYY-MM') + interval '1 month')::date
   AND t.updated_at > p.closed_at - interval '1 hour'
ON CONFLICT DO NOTHING;

-- No search on `updated_at` any more: index the day alone. An upsert of a daily total changes no
-- indexed column then, so it can be a HOT update (no new index entries). `updated_at` stays (a
-- consumer of the previous release still sets it during a rolling upgrade) but is no longer
-- maintained: it says when the row was first written. On a large table, build the index first
-- with CREATE INDEX CONCURRENTLY (same name): this migration then only drops the old one.
CREATE INDEX IF NOT EXISTS usage_daily_totals_by_day ON usage_daily_totals (day);
DROP INDEX IF EXISTS usage_daily_totals_day;
COMMENT ON COLUMN usage_daily_totals.updated_at IS
    'When the row was first written; no longer maintained (late usage is found from usage_late_marks).';
-- A HOT update also needs room on the row's page for the new version: a batch adds to each of
-- the day's rows at most once, and at fillfactor 50 a page has room for a second version of every
-- row on it (as budget_spend, migration 0007). Measured with 1M events of the bench mix in
-- batches of 5,000 (396,354 updates): 0 % HOT before this migration; after it 35-36 % HOT at
-- fillfactor 100, 86-90 % at 70, 99.8 % at 50, and the table (heap + indexes) 21.8 MiB at 50
-- against 52.0 MiB before. Applies to pages written from now on: new days are new rows.
ALTER TABLE usage_daily_totals SET (fillfactor = 50);

-- Budget periods older than the horizon are pruned in batches (storage/budget_pruning.py, run by
-- `llm-usage maintain`): find them by period, not by a scan of every counter. The period is never
-- updated, so counter updates stay HOT. On a large table, build it CONCURRENTLY first.
CREATE INDEX IF NOT EXISTS budget_spend_period_start ON budget_spend (period_start);

-- The usage consumer writes marks; the rollup reads them and deletes the ones it billed.
GRANT SELECT, INSERT, UPDATE, DELETE ON usage_late_marks TO llm_usage_worker;
