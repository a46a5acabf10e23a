"""The pool's batching policy: which request lines travel together, and when a client waits.

The reactor (`pool.py`) owns sockets and the executor; it asks this module two questions, and
the answers are pure functions of what it hands over, testable without a socket or a worker:

- `plan_tasks`: the ready batches of one reactor round (one batch per connection, its complete
  lines) -> executor tasks. Echo and ping cost far less than the trip to a worker, so the cheap
  batches of many connections share one task per worker and the trip is paid once per task,
  not once per line. A batch holding `/sleep` or `/work` is a task of its own, so one slow
  request does not hold up the replies of other connections.
- `throttled`: a connection whose client does not read its replies gets nothing more read or
  submitted once `MAX_UNSENT_OUTPUT` bytes wait for it; the rest queues in the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_UNSENT_OUTPUT = 256 * 1024  # replies waiting for a slow reader before it is throttled
SLOW_COMMANDS = (b"/sleep ", b"/work ", b"/db ")  # worth a task of their own


def is_slow(batch: Sequence[bytes]) -> bool:
    """Whether a batch holds a request worth a task of its own (/sleep, /work, /db)."""
    return any(line.startswith(SLOW_COMMANDS) for line in batch)


def plan_tasks(batches: Sequence[Sequence[bytes]], workers: int) -> list[list[int]]:
    """Group one round's batches into tasks: each slow batch alone, cheap ones in `workers` shares.

    Returns each task as the positions of its batches in `batches`. Slow tasks come first, in
    the order given, then the cheap shares (at most `workers` of them, as even as a ceiling
    division makes them), so a round submits in the same order whatever its mix.
    """
    tasks: list[list[int]] = []
    cheap: list[int] = []
    for index, batch in enumerate(batches):
        if is_slow(batch):
            tasks.append([index])
        else:
            cheap.append(index)
    if cheap:
        size = -(-len(cheap) // workers)  # ceil: one share per worker
        tasks.extend(cheap[start : start + size] for start in range(0, len(cheap), size))
    return tasks


def throttled(unsent: int) -> bool:
    """Whether `unsent` bytes of replies waiting for a client stop its reading and submitting."""
    return unsent > MAX_UNSENT_OUTPUT
