"""Worldsmith: models."""
