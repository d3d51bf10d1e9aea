"""The worklist: studies, instances, jobs, results and exports in a SQL database (SQLite or PostgreSQL)."""
