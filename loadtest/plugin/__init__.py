"""The Locust plugin: the TCP socket users, their client, the workload knobs and the web UI."""
