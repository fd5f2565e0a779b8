"""Worldsmith: launch."""
