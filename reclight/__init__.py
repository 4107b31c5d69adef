"""reclight: off-policy RL fine-tuning of LLMs (REC / REP / RED) on PyTorch Lightning.

The pure maths lives in :mod:`reclight.algorithms`, :mod:`reclight.advantages`,
:mod:`reclight.losses` and :mod:`reclight.sync` (torch + standard library only); the trainer,
rollout engines and CLI build on them. Importing the package stays light: heavy modules are
imported only where used.
"""

__version__ = "0.1.0"
