"""The embedded tiny model: a character-level tokenizer built in code and a small Llama.

Everything here is made locally, so ``reclight fit`` with no config needs no download. The
tokenizer and the randomly initialised model are written with ``save_pretrained`` and read
back with ``from_pretrained``, exactly like a hub model, so the trainer has one code path.

Departures from a "real" LM:

- One token per character (printable ASCII plus ``<pad> <bos> <eos> <unk>``), no merges:
  arithmetic answers then are a handful of tokens and digits never fuse.
- No chat template (the prompt is fed raw), and no BOS is added: prompts are short and fixed.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from reclight.checks import check_int, invalid

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# string.printable minus vertical tab, form feed and carriage return (never in our prompts).
CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c\r")


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the embedded Llama-style model (about 1M parameters by default)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention heads (hidden_size must be divisible by it)."""
    intermediate_size: int = 352
    """Width of the SwiGLU MLP."""
    max_positions: int = 64
    """Longest prompt + response, in characters."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            check_int(f"model.policy.tiny.{name}", getattr(self, name), minimum=1)
        if self.hidden_size % self.num_heads:
            raise invalid("model.policy.tiny.hidden_size", self.hidden_size,
                          f"a multiple of model.policy.tiny.num_heads={self.num_heads}")


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """The character-level tokenizer (WordLevel over single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_config(cfg: TinyModelConfig, vocab_size: int):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        tie_word_embeddings=True,
        initializer_range=0.02,
    )


def tiny_model_path(root: str | os.PathLike, cfg: TinyModelConfig, seed: int) -> Path:
    """The folder holding the tiny model for ``(cfg, seed)``: one folder per shape and seed, so
    a cached model is never silently reused with another seed or shape."""
    c = cfg
    name = f"llama-h{c.hidden_size}-l{c.num_layers}-a{c.num_heads}-i{c.intermediate_size}-p{c.max_positions}-s{seed}"
    return Path(root) / name


def _distributed_rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _wait_for(path: Path, rank: int, timeout: float = 600.0) -> Path:
    """Wait until rank 0's ``build_tiny`` has renamed the finished folder into place."""
    import time

    deadline = time.monotonic() + timeout
    while not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"build_tiny on rank {rank}: rank 0 did not write the tiny model to {path} "
                               f"within {timeout:.0f} s")
        time.sleep(0.1)
    return path


def build_tiny(root: str | os.PathLike, cfg: TinyModelConfig = TinyModelConfig(), seed: int = 0) -> Path:
    """Write the tokenizer and a randomly initialised tiny Llama (seeded by ``seed``) with
    ``save_pretrained`` under ``root`` and return the folder; reuse it if it already exists.

    The folder is written to a temporary sibling and renamed into place, so two runs that build
    the same model at once (or a run killed half-way) never leave a half-written model. Under
    torch.distributed only rank 0 writes (transformers' ``save_pretrained`` skips other ranks,
    which would otherwise rename an EMPTY folder into place); the other ranks wait for it.
    """
    import torch
    from transformers import LlamaForCausalLM

    path = tiny_model_path(root, cfg, seed)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    rank = _distributed_rank()
    if rank:  # transformers' save_pretrained writes nothing on ranks != 0: rank 0 builds it
        return _wait_for(path, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(build_tiny_config(cfg, len(tokenizer)))
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reclight_tiny.txt").write_text(f"{asdict(cfg)} seed={seed}\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race: its folder is equally valid
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
