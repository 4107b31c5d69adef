"""The ``reclight`` command (the console script and ``python -m reclight``), the one top entry:
process-wide settings that must be made before torch is imported, then ``reclight study ...``
to the study (:mod:`reclight.study.cli`) and everything else to the trainer's LightningCLI
(:func:`reclight.trainer.cli.main`). It sits above both, so neither routes a command upward.

OpenMP waiting. torch's CPU kernels run on GNU OpenMP, whose idle worker threads spin (busy-wait)
for a while after each parallel region before they sleep. Alone on a machine that saves a wake-up
per region; beside another such process on the same cores, every spinning thread steals the core
the other process's working threads need, and both crawl. Measured on this project's 2-core
machine, the main job shortened to 100 RL steps (docs/reliability.md, "Sharing the machine"):
alone 85 s; beside a second copy 470 s each (5.5x, not the fair 2x). With
``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once): alone 96 s, beside a copy 124 s (1.3x).
So the console script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it;
``OMP_WAIT_POLICY=ACTIVE reclight fit ...`` restores the spinning (about 11% faster on a machine
the run has to itself). It must be set before libgomp starts, i.e. before ``import torch``:
this module imports nothing heavy before it does.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY_DEFAULT = "PASSIVE"


def configure_process() -> None:
    """Set the OpenMP wait policy (see the module docstring) unless the user chose one, and
    silence jsonargparse's deprecation notices about the API calls Lightning's CLI makes
    (Lightning's code, not the user's: nothing they can act on)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY_DEFAULT)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def entrypoint() -> None:
    """The ``reclight`` console script. Returns None on purpose: the generated wrapper calls
    ``sys.exit(entrypoint())``, and exiting with the CLI object would print it and report failure
    (exit status 1) after a successful run.

    ``reclight study ...`` goes to the study before any LightningCLI is built: a study is not a
    Trainer method (LightningCLI's subcommands are fit/validate/test/predict, each parsing a
    model, data module and trainer), it is many ``reclight fit`` runs (:mod:`reclight.study`)."""
    configure_process()
    if sys.argv[1:2] == ["study"]:
        from reclight.study.cli import main as study_main

        raise SystemExit(study_main(sys.argv[2:]))
    if sys.argv[1:2] == ["calibrate"]:  # measures the clock's costs through a short fit (reclight.trainer.calibrate)
        from reclight.trainer.calibrate import main as calibrate_main

        raise SystemExit(calibrate_main(sys.argv[2:]))
    from reclight.trainer.cli import main

    main()


if __name__ == "__main__":
    entrypoint()
