"""Worldsmith: eval."""
