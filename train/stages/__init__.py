"""Training stages. Importing this package registers ``pretrain`` and ``midtrain``.

RL (``rl/``) and distillation (``distill/``) register their stages from their own packages.
"""

from train.stages.midtrain import Midtrain, MidtrainConfig
from train.stages.pretrain import Pretrain, PretrainConfig

STAGE_CONFIGS = {"pretrain": PretrainConfig, "midtrain": MidtrainConfig}

__all__ = ["Pretrain", "PretrainConfig", "Midtrain", "MidtrainConfig", "STAGE_CONFIGS"]
