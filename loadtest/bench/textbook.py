"""Minimal textbook servers, one per concurrency model, for the benchmark to compare against.

Each is the shortest correct server a tutorial would show for its model, answering with the
project's own protocol (`services.protocol.answer`) so the work per request is identical:

- `threaded`     -- `socketserver.ThreadingTCPServer`: one thread per connection.
- `gevent`       -- `gevent.server.StreamServer`: one greenlet per connection.
- `threadpool`   -- a `selectors` reactor that submits every request line to a
                    `ThreadPoolExecutor`; the worker sends the reply.
- `processpool`  -- the same reactor with a `ProcessPoolExecutor`: the line goes to a worker
                    process and the reply comes back through the executor's pipes (the IPC
                    cost the project's pool server tries to cut).
- `asyncio-streams` -- `asyncio.start_server` on the standard loop: a task per connection,
                    `await reader.readline()`, `writer.write`, `await writer.drain()`.
- `uvloop-protocol` -- a bare `asyncio.Protocol` on uvloop: `data_received` answers each
                    complete line; the fastest Python server measured here.
                    Both wait out a `/sleep` with the loop (`asyncio.sleep`, a timer), as an
                    asyncio program awaits its I/O; `protocol.answer` would block the loop.

They have no metrics, no connection limit, no idle timeout, no line limit and no graceful
shutdown: the benchmark shows what those cost in our servers. The one deviation from the
textbook is the listen backlog (1024, not socketserver's 5), because with a backlog of 5 the
1000-connection scenario measures SYN retries instead of the model.

Run: `python -m loadtest.bench.textbook MODEL [--host H] [--port P] [--workers N]`. It logs
`ready model=textbook-MODEL host=H port=P metrics_port=0` on stderr, like the real servers.
Only standard-library modules are imported at the top: gevent must patch before the rest load.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

KINDS = (
    "socketserver",
    "streamserver",
    "threadpool",
    "processpool",
    "asyncio-streams",
    "uvloop-protocol",
)
BACKLOG = 1024


def _strip(line: bytes) -> bytes:
    """Drop the newline and one carriage return before it."""
    line = line[:-1] if line.endswith(b"\n") else line
    return line[:-1] if line.endswith(b"\r") else line


def _ready(model: str, host: str, port: int) -> None:
    print(
        f"ready model=textbook-{model} host={host} port={port} metrics_port=0",
        file=sys.stderr,
        flush=True,
    )


def serve_threaded(host: str, port: int) -> None:
    """Thread per connection with socketserver."""
    import socketserver

    from services.protocol import answer

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                result = answer(_strip(line))
                self.wfile.write(result.reply)
                if result.close:
                    break

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = BACKLOG

    with Server((host, port), Handler) as server:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _ready("socketserver", host, server.server_address[1])
        server.serve_forever()


def serve_gevent(host: str, port: int) -> None:
    """Greenlet per connection with gevent's StreamServer."""
    from gevent import monkey

    monkey.patch_all()  # so the protocol's time.sleep yields to other greenlets
    import gevent
    from gevent.server import StreamServer

    from services.protocol import answer

    def handle(sock, _address) -> None:
        reader = sock.makefile("rb")
        for line in reader:
            result = answer(_strip(line))
            sock.sendall(result.reply)
            if result.close:
                break

    server = StreamServer((host, port), handle, backlog=BACKLOG)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    _ready("streamserver", host, server.server_port)
    server.serve_forever()


def serve_asyncio_streams(host: str, port: int) -> None:
    """A task per connection with asyncio's streams, on the standard event loop."""
    import asyncio

    from services.protocol import answer, sleep_request

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = sleep_request(_strip(line))
                if request is not None:  # what an async database call would be: awaited
                    await asyncio.sleep(request[0])
                result = request[1] if request is not None else answer(_strip(line))
                writer.write(result.reply)
                await writer.drain()
                if result.close:
                    break
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, host, port, backlog=BACKLOG)
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        _ready("asyncio-streams", host, server.sockets[0].getsockname()[1])
        await stopped.wait()
        server.close()  # and exit: `async with server` would wait for every client to leave

    asyncio.run(serve())


def serve_uvloop_protocol(host: str, port: int) -> None:
    """A bare asyncio.Protocol per connection on uvloop."""
    import asyncio

    import uvloop

    from services.protocol import answer, sleep_request

    class LineProtocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.partial = b""
            self.waiting: list[bytes] = []  # lines behind a /sleep, answered when it is over
            self.sleeping = False

        def data_received(self, data: bytes) -> None:
            *lines, self.partial = (self.partial + data).split(b"\n")
            self.waiting.extend(lines)
            if not self.sleeping:
                self.answer_waiting()

        def answer_waiting(self) -> None:
            lines, self.waiting = self.waiting, []
            replies = []
            for index, line in enumerate(lines):
                request = sleep_request(_strip(line))
                if request is not None:  # a timer, not time.sleep: the loop serves the others
                    self.sleeping = True
                    self.waiting = lines[index + 1 :] + self.waiting
                    asyncio.get_running_loop().call_later(request[0], self.woke, request[1])
                    break
                result = answer(_strip(line))
                replies.append(result.reply)
                if result.close:
                    self.transport.write(b"".join(replies))
                    self.transport.close()
                    return
            self.transport.write(b"".join(replies))

        def woke(self, result: Any) -> None:
            self.sleeping = False
            self.transport.write(result.reply)
            self.answer_waiting()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(LineProtocol, host, port, backlog=BACKLOG)
        stopped = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        _ready("uvloop-protocol", host, server.sockets[0].getsockname()[1])
        await stopped.wait()
        server.close()  # and exit: `async with server` would wait for every client to leave

    uvloop.run(serve())


def serve_reactor(host: str, port: int, executor_kind: str, workers: int) -> None:
    """A selectors reactor that hands every request line to an executor."""
    import selectors
    import socket
    from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
    from functools import partial

    from services.protocol import Answer, answer

    # The process pool is created first: forking after threads exist is unsafe.
    executor = (ProcessPoolExecutor if executor_kind == "process" else ThreadPoolExecutor)(workers)
    selector = selectors.DefaultSelector()
    listener = socket.create_server((host, port), backlog=BACKLOG)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
    pending: dict[socket.socket, bytes] = {}

    def send_reply(conn: socket.socket, future: Future[Answer]) -> None:
        try:
            conn.sendall(future.result().reply)
        except OSError:
            pass  # the client left; the reactor closes the socket when it reads EOF

    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    _ready(executor_kind + "pool", host, listener.getsockname()[1])
    while running:
        for key, _ in selector.select(timeout=0.5):
            sock = key.data  # the client socket; None for the listener
            if sock is None:
                conn, _ = listener.accept()
                conn.setblocking(True)  # readable before recv, and sendall from the workers
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(conn, selectors.EVENT_READ, data=conn)
                pending[conn] = b""
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                pending.pop(sock, None)
                sock.close()
                continue
            *lines, pending[sock] = (pending[sock] + data).split(b"\n")
            for line in lines:
                future = executor.submit(answer, _strip(line))
                future.add_done_callback(partial(send_reply, sock))
    executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.textbook")
    parser.add_argument("model", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.model == "socketserver":
        serve_threaded(args.host, args.port)
    elif args.model == "streamserver":
        serve_gevent(args.host, args.port)
    elif args.model == "asyncio-streams":
        serve_asyncio_streams(args.host, args.port)
    elif args.model == "uvloop-protocol":
        serve_uvloop_protocol(args.host, args.port)
    else:
        serve_reactor(args.host, args.port, args.model.removesuffix("pool"), args.workers)


if __name__ == "__main__":
    main()
