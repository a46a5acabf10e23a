"""The session loop of the blocking models: one connection, its own flow of control.

The threaded and gevent models give each connection a thread or a greenlet that runs
`serve_blocking` until the connection ends: read, answer every complete line, send, repeat. The
pool's reactor needs none of this (it serves connections from events); what every model shares
(framer, tally, session, the registry of connections) is in `services.session`.

`Turns` is the threaded model's answer to an unfair GIL under a crowd: above a number of live
connections, requests are answered in arrival order (services/servers/threaded.py says why).
`NEVER_CROWDED` is the turns of a model that needs none: its threshold is never crossed, so the
loop's only cost is one length comparison per read.
"""

from __future__ import annotations

import _thread
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from services import protocol
from services.session import READ_SIZE, ServerStats, Session

log = logging.getLogger("arena.session")

Receive = Callable[[int], bytes]
SendAll = Callable[[bytes], None]


class Turns:
    """Requests answered in arrival order: a turn handed from thread to thread (first come).

    The GIL lets one thread run at a time but not in arrival order: with a thousand threads
    ready, some wait seconds while others are served again and again. Holding a turn from
    "request read" to "reply sent" makes the order explicit: a thread whose request arrives
    while another holds the turn queues on its own lock and is woken by name. It costs a
    hand-over per request, so a model asks for turns only above `above` live connections.
    """

    def __init__(self, above: int) -> None:
        self.above = above  # take turns only while more connections than this are open
        self.mutex = _thread.allocate_lock()  # guards `held` and `waiting`, never held long
        self.waiting: deque[_thread.LockType] = deque()
        self.held = False
        self.handovers = 0  # turns passed to a queued thread (a metric)

    def take(self) -> None:
        """Wait until every request that arrived earlier has been answered."""
        with self.mutex:
            if not self.held:
                self.held = True
                return
            mine = _thread.allocate_lock()
            mine.acquire()
            self.waiting.append(mine)
        mine.acquire()  # released by the predecessor: the turn is ours (`held` stays True)

    def give_back(self) -> None:
        """Pass the turn to the longest-waiting thread, or free it."""
        with self.mutex:
            if self.waiting:
                self.handovers += 1
                self.waiting.popleft().release()
            else:
                self.held = False


NEVER_CROWDED = Turns(sys.maxsize)  # for models that need no turns: never taken


def serve_blocking(
    session: Session,
    stats: ServerStats,
    timed: bool = True,
    database: protocol.Database | None = None,
    io: tuple[Receive, SendAll] | None = None,
    turns: Turns | None = None,
) -> None:
    """Serve one connection in its own thread or greenlet until it ends; never raises.

    `database` runs `/db` (its query waits in this thread or greenlet); `io` replaces the
    socket's own `recv` and `sendall` where a model has cheaper ones; `turns` makes requests
    wait for their turn in arrival order while the server is crowded.
    """
    sock, tally = session.sock, session.tally
    answer = protocol.answer if database is None else partial(protocol.answer, database=database)
    clock = time.monotonic
    timer = clock if timed else None
    receive, send_all = io or (sock.recv, sock.sendall)
    turns = turns or NEVER_CROWDED
    sessions, crowd = stats.sessions, turns.above
    take, respond = session.take, session.respond
    reason = "client"
    holding = False  # this thread holds a turn (between a request's arrival and its reply)
    try:
        while True:
            data = receive(READ_SIZE)
            if not data:
                reason = "shutdown" if stats.draining else "client"
                break
            if len(sessions) > crowd:
                turns.take()
                holding = True
            session.busy = True
            started = clock() if timed else 0.0
            payload, closing = respond(take(data), answer, started, timer)
            if closing:
                reason = "quit"
            elif session.overflow:
                payload += session.refuse_overlong()
                reason = "line-too-long"
            if payload:
                if holding:
                    # A reply the socket cannot take at once (a client that does not read)
                    # gives the turn back before waiting: a slow reader holds up nobody.
                    try:
                        sent = sock.send(payload, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(payload):
                        holding = False
                        turns.give_back()
                        send_all(payload[sent:])
                else:
                    send_all(payload)
                tally.sent += len(payload)
            if holding:
                holding = False
                turns.give_back()
            session.busy = False
            session.last_active = clock()
            if reason != "client":
                break
            if stats.draining:
                reason = "shutdown"
                break
    except OSError:
        reason = "reset"
    except Exception:  # a bug: contained to this one connection, which is closed
        log.exception("session failed; closing its connection")
        stats.count_internal_error("session")
        reason = "error"
    finally:
        if holding:
            turns.give_back()
        stats.close_session(session, reason)
