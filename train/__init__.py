"""Worldsmith: train."""
