-- The budget consumer hands a batch's ids and counter increments to PostgreSQL by binary COPY
-- into temporary staging tables of its own session (emptied at every commit). PUBLIC may create
-- temporary tables by default, but a hardened database often revokes that: say it explicitly.
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO llm_usage_worker', current_database());
END
$$;
