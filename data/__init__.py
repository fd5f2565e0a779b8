"""Worldsmith: data."""
