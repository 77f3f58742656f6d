"""`llm-usage soak`: the whole pipeline on a 3-broker cluster with replicas of every worker, a
gateway-like load and a seeded fault schedule, then an exact check of the money and a report."""
