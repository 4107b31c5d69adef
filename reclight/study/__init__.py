"""``reclight study``: the paper's off-policy claims measured on a real (tiny) LLM, one command.

A study config (``configs/study/*.yaml``, :mod:`reclight.study.config`) lists arms (a preset +
``reclight fit`` overrides), off-policy settings, seeds, the shared base config and the claims
with their rules. :mod:`~reclight.study.plan` expands it into one warm-up per seed and plain
``reclight fit`` runs, each printable as a self-contained command; :mod:`~reclight.study.warmup`
runs the supervised warm-up once per seed and saves it; :mod:`~reclight.study.runner` runs the
commands in a local process pool, skipping finished ones; :mod:`~reclight.study.report` and
:mod:`~reclight.study.plots` aggregate the run folders into a markdown report (a verdict per
claim from :mod:`reclight.stats`, the bandit bench's code), a summary JSON and PNG plots.
:mod:`~reclight.study.cli` is the command line (docs/study.md).

The top layer of the package: it imports the trainer (to parse and warm up), nothing imports it.
"""
