"""Socket Arena load test: a validating TCP line client, one Locust user per target, /metrics."""
