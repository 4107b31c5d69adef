"""One real RLModule training step on a fixed rollout, in one process or under DDP.

Used by tests/trainer/test_ddp.py (run as a script, because Lightning's CPU ``ddp`` strategy re-launches
the script for every extra rank). Every process builds the same global rollout batch from a
fixed generator and trains on its rank's share, chosen by ``PromptSource.for_step``;
after the step each rank saves its gradients and parameters to ``OUT/rank{r}.pt``.

    python tests/trainer/ddp_worker.py WORLD_SIZE OUT_DIR TINY_DIR [ALGORITHM [LOSS_AGG [STRATEGY [EPOCHSxMINI_BATCHES [lora]]]]]

STRATEGY is ``ddp`` (default) or ``fsdp`` (FSDP2 through Lightning's ``ModelParallelStrategy``,
the policy sharded by ``RLModule.configure_model``); the saved gradients and parameters are the
full tensors either way (``lora``: a rank-4 LoRA adapter is trained; only its tensors have
gradients, and the engine receives the merged weights). The engine is also synced once after the step (a collective gather under
FSDP) and its weights saved, so the test can check the sync path.
"""

import sys

import torch
from lightning.pytorch import Trainer

from reclight.engines.base import SamplingConfig
from reclight.engines.config import EngineConfig
from reclight.models.tiny import TinyModelConfig
from reclight.models.tokens import encode_prompts
from reclight.rollout.batch import RolloutBatch
from reclight.tasks.arithmetic import Arithmetic
from reclight.trainer.config import AlgorithmGroup, MonitorConfig, OptimConfig, PolicyConfig, UpdatesConfig
from reclight.trainer.data import RLDataModule
from reclight.trainer.module import RLModule

B, K, T = 4, 3, 5


def fixed_rollout(module: RLModule, datamodule: RLDataModule) -> RolloutBatch:
    """The GLOBAL batch of step 0: every prompt of the step, K random responses each, with
    random behaviour log-probs (ratios far from 1, so clipping acts), lengths and rewards."""
    g = torch.Generator().manual_seed(123)
    src = module.prompts
    idx = src.sampler.indices(0)  # all ranks' prompts, in order
    prompts = [src.train[i].prompt for i in idx]
    prompt_ids, prompt_mask = encode_prompts(module.tokenizer, prompts, use_chat_template=False)
    vocab = module.policy.get_input_embeddings().num_embeddings
    lengths = torch.randint(1, T + 1, (B, K), generator=g)
    return RolloutBatch(
        step=0,
        example_index=torch.tensor(idx),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(3, vocab, (B, K, T), generator=g),
        response_mask=torch.arange(T) < lengths[..., None],
        logp_behav=-torch.rand(B, K, T, generator=g) * 4,
        version=torch.zeros(B, K, dtype=torch.long),
        rewards=(torch.rand(B, K, generator=g) < 0.5).float(),
        reward_valid=torch.ones(B, K, dtype=torch.bool),
        correct=torch.zeros(B, K, dtype=torch.bool),
    )


class FixedRolloutModule(RLModule):
    """Trains on this rank's rows of the fixed global batch instead of the queue's rollouts."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        datamodule = self.trainer.datamodule
        full = fixed_rollout(self, datamodule)
        mine, _ = self.prompts.for_step(self.global_step)
        rows = [full.example_index.tolist().index(i) for i in mine]
        state = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in full.state_dict().items()}
        return RolloutBatch.from_state_dict(state)


def _strategy(name: str, world: int):
    if world == 1:
        return "auto"
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return "ddp"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard under FSDP2


def main(world: int, out: str, tiny_dir: str, algorithm: str = "grpo", loss_agg: str = "token_mean",
         strategy: str = "ddp", updates: str = "1x1", lora: str = "full") -> None:
    epochs, mini_batches = (int(x) for x in updates.split("x"))
    extra = {}
    if lora == "lora":
        from reclight.models.lora import LoraConfig

        extra = {"lora": LoraConfig(enabled=True, rank=4)}
    module = FixedRolloutModule(
        policy=PolicyConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                            tiny_dir=tiny_dir, **extra),
        algorithm=AlgorithmGroup(preset=algorithm, loss_agg=loss_agg),
        sampling=SamplingConfig(num_samples=K, max_new_tokens=T), optim=OptimConfig(grad_clip=0.0),
        monitor=MonitorConfig(log_kl_init=False), seed=0, warmup=None,  # the step is what is compared
        engine=EngineConfig(name="hf"),  # its weights are compared after the sync (the fast engine fuses them)
        updates=UpdatesConfig(epochs=epochs, mini_batches=mini_batches),
    )
    data = RLDataModule(task=Arithmetic(val_size=8, test_size=8), prompts_per_step=B, eval_size=4, seed=0)
    trainer = Trainer(
        accelerator="cpu", devices=world, strategy=_strategy(strategy, world), max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    policy = module.policy
    module.rollouts.engine.update_weights(policy, 1)  # the weight sync path (gathers full tensors when sharded)
    engine = {n: p.detach().clone() for n, p in module.rollouts.engine.model.named_parameters()}
    torch.save(
        {
            "grads": {n: _full(p.grad).detach().clone() for n, p in policy.named_parameters() if p.grad is not None},
            "params": {n: _full(p).detach().clone() for n, p in policy.named_parameters()},
            "engine": engine,
            "sharded": type(policy.model.layers[0].self_attn.q_proj.weight).__name__,
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:])
