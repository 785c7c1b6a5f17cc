"""Strategy tables and what feeds them: workload buckets, the stored table and online
re-measurement."""
