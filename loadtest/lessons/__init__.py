"""Lessons: the arena's claims about the models, shown live in Locust and checked in isolation."""
