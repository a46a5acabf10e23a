"""Process tools: run the arena as local processes (stack, soak, PostgreSQL, replicas) and write
or check its generated files (docs figures, the dashboard); what they share (procs, cli)."""
