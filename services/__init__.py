"""Socket Arena servers: one line protocol, four concurrency models.

Kept empty on purpose: `python -m services gevent` must be able to monkey-patch before any
module that creates sockets, threads or locks is imported.
"""
