"""Former WorldDiT step benchmark, kept as an alias so recorded commands still run.

Its training mode (forward + backward without an optimizer) is ``benchmarks/train_step.py --no-optim``
with the same flags; its inference mode (context fill + one cached step) is measured, through the
real sampler and per phase, by ``benchmarks/rollout.py``.

    python -m benchmarks.dit_step --preset base --backend sdpa flex   # == train_step --no-optim --preset base ...
"""

from __future__ import annotations

import sys

from benchmarks import train_step


def main(argv: list[str] | None = None):
    args = list(sys.argv[1:] if argv is None else argv)
    if "--mode" in args:
        i = args.index("--mode")
        mode = args[i + 1] if i + 1 < len(args) else ""
        if mode == "infer":
            raise SystemExit("benchmarks.dit_step --mode infer moved to: python -m benchmarks.rollout "
                             "(context pass and each cached denoising step, timed inside the sampler)")
        del args[i:i + 2]
    return train_step.main(["--no-optim", *args])


if __name__ == "__main__":
    main()
