-- Issue 23: blocking limits, and holds the gateway places before a request (POST /v1/budget-checks).

-- On Citus, once budget_policies is distributed, its ALTER below runs on the shards in parallel,
-- after which Citus refuses to propagate the functions' CREATE in the same transaction; one
-- connection per worker lets it do both (a placeholder setting on plain PostgreSQL).
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

-- A policy's limits alert (today's behaviour) or also block checks. Constant default: no rewrite.
ALTER TABLE budget_policies
    ADD COLUMN IF NOT EXISTS enforcement text NOT NULL DEFAULT 'alert';
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'budget_policies_enforcement') THEN
        ALTER TABLE budget_policies ADD CONSTRAINT budget_policies_enforcement
            CHECK (enforcement IN ('alert', 'block'));
    END IF;
END
$$;

-- One row per checked request: the first answer (a repeat returns it) and, for an allow, the hold.
-- A hold covers every counter the request would count toward, in the check's UTC day and month:
-- the tenant, and each attribution sent (deployment, user, agent), daily and monthly
-- (domain/holds.py `hold_counters`). It ends exactly once: `settled` by the budget consumer in the
-- transaction that counts its event (or by the sweeper, when it finds that event already
-- counted), or `expired` by the sweeper. A deny holds nothing (`denied`, ended at once).
-- Keyed with tenant_id so that it is distributed with the tenant's counters under Citus.
CREATE TABLE IF NOT EXISTS budget_holds (
    tenant_id           text        NOT NULL,
    gateway_request_id  text        NOT NULL,
    deployment_id       text,
    user_id             text,
    agent_id            text,
    day                 date        NOT NULL,  -- the check's UTC day; its month is the monthly period
    amount_usd          numeric     NOT NULL CONSTRAINT budget_holds_amount CHECK (amount_usd >= 0),
    decision            text        NOT NULL CONSTRAINT budget_holds_decision
        CHECK (decision IN ('allow', 'deny')),
    denied_by           jsonb,                 -- the answer's denied_by (numbers exact), null for allow
    state               text        NOT NULL CONSTRAINT budget_holds_state
        CHECK (state IN ('open', 'settled', 'expired', 'denied')),
    ended_by            text        CONSTRAINT budget_holds_ended_by
        CHECK (ended_by IN ('consumer', 'sweeper')),
    checked_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    ended_at            timestamptz,
    settled_charge_usd  numeric,               -- the counted event's charge, when settled
    CONSTRAINT budget_holds_pkey PRIMARY KEY (tenant_id, gateway_request_id),
    CONSTRAINT budget_holds_denied CHECK ((decision = 'deny') = (state = 'denied')),
    CONSTRAINT budget_holds_ended CHECK ((state = 'open') = (ended_at IS NULL))
);
-- The sweeper's two walks: open holds by expiry, ended rows to forget.
CREATE INDEX IF NOT EXISTS budget_holds_open ON budget_holds (expires_at) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS budget_holds_ended ON budget_holds (expires_at) WHERE state <> 'open';

-- What is held per counter: placed (by allows) and ended (settled or expired), both only ever
-- grow, and held = placed - ended. Created at 0 by the first check that needs the counter, and locked by
-- every check, settlement and expiry in the SpendKey order (COLLATE "C"). No CHECK (ended <= placed):
-- PostgreSQL checks constraints on the proposed row of INSERT ... ON CONFLICT before it finds the
-- conflict, and settlement adds to `ended_usd` by that upsert (tests and reconcile check it).
CREATE TABLE IF NOT EXISTS budget_held (
    tenant_id    text    NOT NULL,
    scope_type   text    NOT NULL,
    scope_id     text    NOT NULL,
    "window"     text    NOT NULL CONSTRAINT budget_held_window CHECK ("window" IN ('daily', 'monthly')),
    period_start date    NOT NULL,
    placed_usd   numeric NOT NULL DEFAULT 0 CONSTRAINT budget_held_placed CHECK (placed_usd >= 0),
    ended_usd    numeric NOT NULL DEFAULT 0 CONSTRAINT budget_held_ended CHECK (ended_usd >= 0),
    CONSTRAINT budget_held_pkey PRIMARY KEY (tenant_id, scope_type, scope_id, "window", period_start)
-- Every check and settlement updates these rows: HOT updates, as budget_spend (0007). Set here,
-- not by ALTER TABLE: run again on Citus, that ALTER of the distributed table is sent to the
-- shards with the whole migration's text, which they refuse (multiple commands).
) WITH (fillfactor = 50);
-- Pruning walks old periods.
CREATE INDEX IF NOT EXISTS budget_held_period_start ON budget_held (period_start);

-- A wait over 2 s for the counters ends the check (the API answers 503, to be retried with the
-- same id). On Citus the locks are waited for on the tenant's worker, which the timeout reaches
-- only as a SET LOCAL that Citus propagates: it does so inside a function called from a query
-- (here, `PERFORM` in budget_check), not from a statement of the function called by the client.
-- On plain PostgreSQL citus.propagate_set_commands is a placeholder setting, without effect.
CREATE OR REPLACE FUNCTION budget_check_lock_timeout() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    SET LOCAL citus.propagate_set_commands = 'local';
    SET LOCAL lock_timeout = '2s';
END
$$;

-- The check (storage/budget_holds.py `place_check`), called in autocommit so that its row locks
-- are held only while it runs. Python passes the counters (domain/holds.py `hold_counters`) as
-- four parallel arrays in lock order, so the scope rule stays in one place. Every statement
-- names tenant_id = p_tenant_id: on Citus each is a router query to the tenant's worker.
-- Checks of one tenant serialise on its `tenant` counter rows; each reads spend and held after
-- its locks are granted, and adds its estimate before it releases them (design §3.3).
CREATE OR REPLACE FUNCTION budget_check(
    p_tenant_id text, p_request_id text, p_deployment_id text, p_user_id text, p_agent_id text,
    p_day date, p_amount numeric, p_checked_at timestamptz, p_expires_at timestamptz,
    p_scope_types text[], p_scope_ids text[], p_windows text[], p_period_starts date[])
RETURNS TABLE (o_decision text, o_denied_by jsonb, o_expires_at timestamptz,
               o_amount_usd numeric, o_repeated boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_denied jsonb;
BEGIN
    PERFORM budget_check_lock_timeout();
    -- 1. A repeat answers what the first check answered, and holds nothing more.
    RETURN QUERY SELECT h.decision, h.denied_by, h.expires_at, h.amount_usd, true
        FROM budget_holds AS h
        WHERE h.tenant_id = p_tenant_id AND h.gateway_request_id = p_request_id;
    IF FOUND THEN RETURN; END IF;

    -- 2. Every counter exists (created at 0, in key order), then is locked in key order.
    INSERT INTO budget_held (tenant_id, scope_type, scope_id, "window", period_start)
    SELECT p_tenant_id, c.s, c.i, c.w, c.p
    FROM unnest(p_scope_types, p_scope_ids, p_windows, p_period_starts) AS c(s, i, w, p)
    ORDER BY c.s COLLATE "C", c.i COLLATE "C", c.w COLLATE "C", c.p
    ON CONFLICT DO NOTHING;
    PERFORM 1
    FROM budget_held AS h
    JOIN unnest(p_scope_types, p_scope_ids, p_windows, p_period_starts) AS c(s, i, w, p)
        ON (h.scope_type, h.scope_id, h."window", h.period_start) = (c.s, c.i, c.w, c.p)
    WHERE h.tenant_id = p_tenant_id
    ORDER BY h.scope_type COLLATE "C", h.scope_id COLLATE "C", h."window" COLLATE "C",
             h.period_start
    FOR UPDATE OF h;

    -- 3. A new statement, so a new snapshot: it sees every transaction that committed before
    --    the locks were granted. Each blocking limit: spend + held + this estimate <= limit.
    SELECT jsonb_agg(jsonb_build_object(
               'scope_type', c.s, 'scope_id', c.i, 'window', c.w, 'limit_usd', l.limit_usd,
               'spend_usd', coalesce(s.spend_usd, 0), 'held_usd', h.placed_usd - h.ended_usd)
           ORDER BY array_position(ARRAY['tenant', 'deployment', 'user', 'agent'], c.s), c.w)
    INTO v_denied
    FROM unnest(p_scope_types, p_scope_ids, p_windows, p_period_starts) AS c(s, i, w, p)
    JOIN budget_policies AS pol
        ON pol.tenant_id = p_tenant_id AND pol.scope_type = c.s AND pol.scope_id = c.i
       AND pol.enforcement = 'block'
    CROSS JOIN LATERAL (SELECT CASE c.w WHEN 'daily' THEN pol.daily_limit_usd
                                        ELSE pol.monthly_limit_usd END AS limit_usd) AS l
    JOIN budget_held AS h
        ON h.tenant_id = p_tenant_id
       AND (h.scope_type, h.scope_id, h."window", h.period_start) = (c.s, c.i, c.w, c.p)
    LEFT JOIN budget_spend AS s
        ON s.tenant_id = p_tenant_id
       AND (s.scope_type, s.scope_id, s."window", s.period_start) = (c.s, c.i, c.w, c.p)
    WHERE l.limit_usd IS NOT NULL
      AND coalesce(s.spend_usd, 0) + (h.placed_usd - h.ended_usd) + p_amount > l.limit_usd;

    -- 4. Record the answer. A concurrent duplicate whose counters did not overlap ours (only
    --    across a day or month boundary) meets ours here: the loser answers the winner's answer.
    INSERT INTO budget_holds (tenant_id, gateway_request_id, deployment_id, user_id, agent_id,
        day, amount_usd, decision, denied_by, state, checked_at, expires_at, ended_at)
    VALUES (p_tenant_id, p_request_id, p_deployment_id, p_user_id, p_agent_id, p_day, p_amount,
        CASE WHEN v_denied IS NULL THEN 'allow' ELSE 'deny' END, v_denied,
        CASE WHEN v_denied IS NULL THEN 'open' ELSE 'denied' END, p_checked_at, p_expires_at,
        CASE WHEN v_denied IS NULL THEN NULL ELSE p_checked_at END)
    ON CONFLICT (tenant_id, gateway_request_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT h.decision, h.denied_by, h.expires_at, h.amount_usd, true
            FROM budget_holds AS h
            WHERE h.tenant_id = p_tenant_id AND h.gateway_request_id = p_request_id;
        RETURN;
    END IF;
    IF v_denied IS NULL THEN  -- 5. The hold: every counter, already locked by us.
        UPDATE budget_held AS h SET placed_usd = h.placed_usd + p_amount
        FROM unnest(p_scope_types, p_scope_ids, p_windows, p_period_starts) AS c(s, i, w, p)
        WHERE h.tenant_id = p_tenant_id
          AND (h.scope_type, h.scope_id, h."window", h.period_start) = (c.s, c.i, c.w, c.p);
    END IF;
    RETURN QUERY SELECT CASE WHEN v_denied IS NULL THEN 'allow' ELSE 'deny' END, v_denied,
        p_expires_at, p_amount, false;
END
$$;

-- The API checks and the budget consumer settles and sweeps, both as the worker role.
GRANT SELECT, INSERT, UPDATE, DELETE ON budget_holds TO llm_usage_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON budget_held TO llm_usage_worker;
GRANT EXECUTE ON FUNCTION budget_check_lock_timeout() TO llm_usage_worker;
GRANT EXECUTE ON FUNCTION budget_check(text, text, text, text, text, date, numeric,
    timestamptz, timestamptz, text[], text[], text[], date[]) TO llm_usage_worker;
