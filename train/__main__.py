"""``python -m train experiment=NAME [overrides]``: the one entry point of every training stage.

``python -m train --cfg job`` prints the resolved config; ``-m`` runs a Hydra sweep (one run per
point, each in a directory named by its overrides).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from configs import CONFIG_DIR
from configs.schema import register_configs

# The run directory gets "_<overrides>" only when there are overrides.
if not OmegaConf.has_resolver("ws_suffix"):
    OmegaConf.register_new_resolver("ws_suffix", lambda s: f"_{s}" if s else "")
register_configs()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from train.run import run  # heavy imports only once a run is really starting

    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
