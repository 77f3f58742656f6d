"""The rollup worker: each UTC month's invoice lines per tenant and deployment, from the exact
daily totals the usage consumer keeps; closed months are final and late usage becomes
adjustment lines (docs/contract.md, "Invoice lines")."""
