"""``python -m train experiment=NAME [overrides]``: the one entry point of every training stage.

``python -m train --cfg job`` prints the resolved config; ``-m`` runs a Hydra sweep (one run per
point, ``<sweep dir>/<num>_<slug>``, and ``summary.md`` when it ends). Runs are named and found
again as ``train/runs.py`` describes: ``outputs/<name>/<time>_<slug>_<id>``; the same command plus
``checkpoint.resume=latest`` continues the newest run with the same overrides.

Before Hydra creates a run directory the command line is checked (:func:`prepare`): the config is
composed and validated (misspelt or ``+``-added keys, types, values; sweeps at their first point),
the dataset must exist, and a resume picks its run directory, so a bad command leaves nothing behind.
"""

from __future__ import annotations

import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from configs import CONFIG_DIR
from configs.schema import register_configs

register_configs()  # the schema and the run-naming resolvers


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from train.run import run  # heavy imports only once a run is really starting

    hc = HydraConfig.get()
    run(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task),
        exclude=list(hc.job.config.override_dirname.exclude_keys))


def _quote(value: str) -> str:
    """A Hydra override value that parses whatever characters the path holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def prepare(argv: list[str]) -> list[str]:
    """Check a ``python -m train`` command line; return it, with ``hydra.run.dir`` added when resuming.

    Exits with status 2 and a message naming the key / path on a bad config, a missing dataset or
    a resume that finds no run.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from configs.schema import ConfigError, compose_checked
    from train.data import check_data_exists
    from train.runs import RunNotFoundError, resume_run_dir

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return argv
    try:
        cfg, obj = compose_checked(list(args.overrides), return_hydra_config=True)
        if args.cfg or args.multirun:
            return argv  # printing only / each sweep point is checked again when it runs
        parsed = OverridesParser.create().parse_overrides(list(args.overrides))
        check_data_exists(obj.data)
        if any(o.get_key_element() == "hydra.run.dir" for o in parsed):
            return argv  # an explicit run directory: resume=latest means its own latest checkpoint
        task = [o.input_line for o in parsed if not o.is_hydra_override()]
        exclude = list(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys") or [])
        found = resume_run_dir(obj.checkpoint.resume, obj.out_root, obj.name, task, exclude)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"python -m train: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if found is None:
        return argv
    print(f"[worldsmith] checkpoint.resume={obj.checkpoint.resume}: continuing the run in {found}", flush=True)
    return [*argv, f"hydra.run.dir={_quote(str(found))}"]


def cli(argv: Optional[list[str]] = None) -> None:
    """``python -m train``: :func:`prepare`, then Hydra's entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = [sys.argv[0], *prepare(argv)]
    main()


if __name__ == "__main__":
    cli()
