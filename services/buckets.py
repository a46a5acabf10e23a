"""Request-duration bucket bounds, shared by the servers' histogram and the Locust client's.

No imports at all: the Locust image ships this file (with protocol.py and models.py) without
the servers, so both sides of a run bucket durations on the same bounds.
"""

# Seconds: sub-millisecond resolution for loopback echo (tens of microseconds) up to the
# longest /sleep (60 s), on Prometheus's 1, 2.5, 5 ladder.
DURATION_BUCKETS = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
