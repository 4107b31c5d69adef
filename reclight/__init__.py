"""reclight: off-policy RL fine-tuning of LLMs (REC / REP / RED) on PyTorch Lightning.

Layout (imports point down this list, never up; ``tests/core/test_imports.py`` checks it):

- the core, torch and the standard library only: :mod:`reclight.algorithms`,
  :mod:`reclight.advantages`, :mod:`reclight.losses`, :mod:`reclight.sync` and the shared
  validation helpers :mod:`reclight.checks` (the bandit bench calls the same functions);
- :mod:`reclight.tasks`: verifiable tasks (prompts and reward functions);
- :mod:`reclight.kernels`: chunked log-probs, the Llama decoder pieces, the fused forward;
- :mod:`reclight.models`: loading the policy, tokenizer conventions, the training forward;
- :mod:`reclight.engines`: rollout engines (HF ``generate``, fast Llama, vLLM);
- :mod:`reclight.rollout`: the batch format, the prompt sampler, scoring, the rollout queue;
- :mod:`reclight.trainer`: the LightningModule, its typed config groups and the CLI.

Importing the package stays light: heavy modules are imported only where used.
"""

__version__ = "0.1.0"
