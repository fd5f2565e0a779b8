"""Checkpoint converters: released HunyuanVideo-1.5 / HY-WorldPlay weights in and out of WorldDiT bundles.

One module per source format, one mapping to WorldDiT:

* :mod:`models.convert.hunyuan`: the official HunyuanVideo-1.5 layout (``transformer/480p_i2v``) <-> WorldDiT,
  and reading a WorldDiT config from such a checkpoint;
* :mod:`models.convert.diffusers`: diffusers' ``HunyuanVideo15Transformer3DModel`` -> the official layout;
* :mod:`models.convert.worldplay`: HY-WorldPlay's action checkpoints (``ar_model``, ``ar_rl_model``,
  ``ar_distilled_action_model``, ``bidirectional_model``) -> bundles with WorldPlay's sampling settings, and a
  bundle -> the checkpoint layout WorldPlay's own inference loads;
* :mod:`models.convert.embeddings`: HunyuanVideo-1.5's text / glyph / image encoders -> a precomputed-embeddings
  file (so neither training nor inference keeps the 7B text encoder resident).

Command line: ``python -m models.convert {diffusers,hunyuan,worldplay,export-worldplay,embeddings} --help``.
Every converter consumes every key, checks every shape and raises :class:`ConversionError` naming the key.
"""

from models.convert.common import ConversionError

__all__ = ["ConversionError"]
