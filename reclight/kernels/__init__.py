"""Numerical kernels shared by the trainer and the engines: chunked log-probs
(:mod:`~reclight.kernels.logprobs`), the Llama decoder pieces (:mod:`~reclight.kernels.llama`),
the fused training forward (:mod:`~reclight.kernels.fused_forward`), position and mask helpers
(:mod:`~reclight.kernels.masks`), the torch.compile availability check
(:mod:`~reclight.kernels.compile`) and pieces of one computation run side by side on threads
(:mod:`~reclight.kernels.threads`). Torch only: nothing here imports transformers or
Lightning."""
