"""Numerical kernels shared by the trainer and the engines: chunked log-probs
(:mod:`~reclight.kernels.logprobs`), the Llama decoder pieces (:mod:`~reclight.kernels.llama`),
the fused training forward (:mod:`~reclight.kernels.fused_forward`), position and mask helpers
(:mod:`~reclight.kernels.masks`) and the torch.compile availability check
(:mod:`~reclight.kernels.compile`). Torch only: nothing here imports transformers or
Lightning."""
