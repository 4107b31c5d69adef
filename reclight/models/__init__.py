"""The policy model: loading (:mod:`~reclight.models.loading`), tokenizer conventions
(:mod:`~reclight.models.tokens`), the training forward (:mod:`~reclight.models.forward`), the
embedded tiny model (:mod:`~reclight.models.tiny`) and FSDP2 (:mod:`~reclight.models.fsdp`)."""
