"""Worldsmith: configs."""
