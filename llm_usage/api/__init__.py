"""The HTTP API (`llm-usage serve api`): tenant-scoped usage and budget reads for portals, policy
changes for tenant admins, invoice lines for finance, and the gateways' HTTP ingest path."""
