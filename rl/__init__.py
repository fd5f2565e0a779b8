"""Worldsmith: rl."""
