-- Charges the price table estimated (the gateway sent none): each event says whether its charge
-- was estimated and from which price row (its provider and model, and this `effective_from`),
-- and the aggregates keep how much of their exact charge was estimated, for reports and invoice
-- lines. Constant defaults: adding the columns rewrites no table.
ALTER TABLE llm_usage_events
    ADD COLUMN IF NOT EXISTS charge_estimated boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS price_effective_from timestamptz;

ALTER TABLE usage_daily_totals
    ADD COLUMN IF NOT EXISTS estimated_charge_usd numeric NOT NULL DEFAULT 0;

ALTER TABLE usage_daily_dimensions
    ADD COLUMN IF NOT EXISTS estimated_charge_usd numeric NOT NULL DEFAULT 0;
