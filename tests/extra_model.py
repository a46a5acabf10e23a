"""A fifth model's registry entry, written inside the tests: the recipe's proof (test_recipe.py).

Registered only when ARENA_EXTRA_MODELS names it; its server is tests/extra_server.py.
"""

from __future__ import annotations

from services.models import Model, Variant

MODEL = Model(
    "plainthreads",
    "tests.extra_server:PlainThreadsServer",
    "the textbook thread per connection: a threading.Thread for each (the recipe test's model)",
    "yellow",
    9009,
    flow="thread",
    variants=(Variant("plainthreads"),),
)
