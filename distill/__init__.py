"""Worldsmith: distill."""
