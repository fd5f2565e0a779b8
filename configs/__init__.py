"""Worldsmith's Hydra configuration tree: typed schemas (schema.py) plus experiment files."""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent)
