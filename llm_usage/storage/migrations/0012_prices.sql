-- The price table (issue 22): exact USD per million tokens per (provider, model), each row in
-- effect from `effective_from` until the pair's next row. Rows are only ever added: a row whose
-- time has come never changes, so an event is always priced again by the row that priced it
-- (llm_usage/domain/prices.py decides which additions are allowed; storage/prices.py adds them).
CREATE TABLE prices (
    provider         text        NOT NULL,
    model            text        NOT NULL,
    effective_from   timestamptz NOT NULL,
    input            numeric     NOT NULL CHECK (input >= 0),
    cached_input     numeric     NOT NULL CHECK (cached_input >= 0),
    output           numeric     NOT NULL CHECK (output >= 0),
    reasoning        numeric     NOT NULL CHECK (reasoning >= 0),
    request_fee_usd  numeric     NOT NULL DEFAULT 0 CHECK (request_fee_usd >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text        NOT NULL,
    PRIMARY KEY (provider, model, effective_from)
);

-- Every row added: when, who, the pair's latest row before it (null for the pair's first) and
-- the row added, as the policy audit keeps its changes (0002, budget_policy_audit).
CREATE TABLE price_changes (
    id         bigserial   PRIMARY KEY,
    changed_at timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    provider   text        NOT NULL,
    model      text        NOT NULL,
    old_price  jsonb,
    new_price  jsonb       NOT NULL
);
CREATE INDEX price_changes_pair ON price_changes (provider, model, id);

-- The consumers read the table to price events; `llm-usage prices` and the API (which log in
-- with this role) add rows and their audit. Nothing updates or deletes either.
GRANT SELECT, INSERT ON prices TO llm_usage_worker;
GRANT SELECT, INSERT ON price_changes TO llm_usage_worker;
-- 0004 granted the sequences that existed then; this one is new.
GRANT USAGE ON SEQUENCE price_changes_id_seq TO llm_usage_worker;
