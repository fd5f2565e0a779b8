"""Worldsmith: rl. WorldCompass RL post-training (``stage=rl``, registered by ``rl.stage``); see ``rl/README.md``.

| module | what it owns |
|---|---|
| ``config`` | ``RLStageConfig``: every knob of research/rl_distill.md §6 |
| ``paths`` | start images from any clip-contract dataset, the camera paths (the evaluation's planners), the curriculum |
| ``rollouts`` | clip-level group rollouts through ``models.rollout.Rollout``, decoding, reward batches |
| ``rewards/`` | the reward interface and the rewards (action, exact geometry, drift, revisit, learned) |
| ``advantages`` | the trainer's side: per-reward standardisation, weights, Best-of-N, clipping, r in [0, 1] |
| ``nft`` | the DiffusionNFT loss (and the released WorldCompass update for comparison) |
| ``shadow`` | the EMA rollout policy shadow |
| ``stage`` | the stage: roles, the step, checkpointed state, bundle export |
| ``evaluate`` | rewards of a policy on fixed paths (sample hook, before/after) |
| ``demo`` | the RL step of ``make demo`` |
"""
