"""Worldsmith: infer."""
