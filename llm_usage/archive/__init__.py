"""Verified Parquet archives of a month of usage events (issue 20, retention).

A month past RETENTION_MONTHS is detached from `llm_usage_events`, written here as Parquet, one
file per tenant slice, with a manifest of exact totals; the archive is read back and compared with
the detached table before the table is dropped, and `llm-usage archive restore` brings a month
back into a plain table for an audit.

- `manifest`: the manifest of a month and its exact maths (pure).
- `targets`: where archives live: a local directory or an S3-compatible object store.
- `export`: a partition table to Parquet files and their manifest, in bounded memory.
- `verify`: every file read back against the manifest, and against the table when it is there.
- `corrections`: the month's `usage_corrections` and `usage_event_effective` rows, archived
  beside its events, deleted with its partition, restored beside its events (design §4, A11).
- `restore`: an archived month into `restored_usage_events_YYYY_MM`, never the live table.
- `retention`: the step `llm-usage maintain` runs between DETACH and DROP (archive once, verify
  against the table every time; drop only on an OK report).
"""
