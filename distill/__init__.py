"""Context Forcing distillation (and Self-Forcing DMD as its baseline): stages ``ode_init`` and ``distill``.

Importing :mod:`distill.stage` registers both stages; their configs (:mod:`distill.config`) are in the
Hydra store (``configs/schema.py``). See ``distill/README.md``.
"""
