-- Issue 24: the id window keeps the whole attribution of the copy it holds (user and agent
-- beside the deployment), so that the budget consumer can move the counters for a correction of
-- an event still in the window from the window's row alone, without a probe of the stored event.
--
-- `attributed` tells the rows written with the two columns from those written before them (and
-- by the backfill function of 0008): for those, null would not mean "no user". Adding columns
-- with constant defaults rewrites nothing. The rows written before age out with the window.

-- On Citus, run on one connection per worker, as 0015 (a placeholder setting elsewhere).
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

ALTER TABLE usage_event_ids
    ADD COLUMN IF NOT EXISTS user_id text,
    ADD COLUMN IF NOT EXISTS agent_id text,
    ADD COLUMN IF NOT EXISTS attributed boolean NOT NULL DEFAULT false;
