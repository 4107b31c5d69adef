"""Keys of a command line or config file that name nothing: a key of the flat layout that moved
into a typed group (``model.lr`` -> ``model.optim.lr``), a group given as a string (``model.engine:
fast``, ``model.algorithm: grpo``) or a field its group does not have. :func:`key_errors` finds
them all before jsonargparse parses, so each is reported with what to write instead.

Removal point: the flat layout (``MOVED_KEYS`` and the string forms of ``model.engine`` and
``model.train_forward``) existed before reclight 0.1.0's typed groups; drop those entries at the
first release after 0.1.0. ``model.algorithm: <preset>`` and ``model.algorithm_overrides`` were
the algorithm's form until the typed ``model.algorithm`` group: drop them at the same release.
The unknown-field check stays.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reclight.trainer.config import MODEL_GROUPS
from reclight.yamlio import load_yaml_file

MOVED_KEYS: dict[str, str] = {
    "model.model_name_or_path": "model.policy.name_or_path",
    "model.tiny": "model.policy.tiny",
    "model.tiny_dir": "model.policy.tiny_dir",
    "model.dtype": "model.policy.dtype",
    "model.use_chat_template": "model.policy.use_chat_template",
    "model.engine_dtype": "model.engine.dtype",
    "model.engine_options": "model.engine.fast (compile_decode) or model.engine.vllm (gpu_memory_utilization, "
                            "max_model_len, enforce_eager, recompute_logp_behav)",
    "model.attn_implementation": "model.train_forward.attn_implementation",
    "model.micro_batch_size": "model.train_forward.micro_batch_size",
    "model.lr": "model.optim.lr",
    "model.weight_decay": "model.optim.weight_decay",
    "model.betas": "model.optim.betas",
    "model.grad_clip": "model.optim.grad_clip",
    "model.lr_warmup_steps": "model.optim.lr_warmup_steps",
    "model.max_failed_reward_frac": "model.guards.max_failed_reward_frac",
    "model.max_consecutive_skips": "model.guards.max_consecutive_skips",
    "model.log_kl_init": "model.monitor.log_kl_init",
    "model.eval_max_new_tokens": "model.monitor.eval_max_new_tokens",
    "sync": "model.sync",
    "model.algorithm_overrides": "model.algorithm (its fields sit beside the preset now: "
                                 "model.algorithm: {preset: dapo, eps_high: 0.3})",
}
"""Keys of the flat layout (before the typed groups) and where each one lives now."""

GROUP_STRINGS: dict[str, str] = {
    "model.algorithm": "model.algorithm.preset: {value}",
    "model.engine": "model.engine.name: {value}",
    "model.train_forward": "model.train_forward.impl: {value}",
}
"""Keys that were strings and are groups now: ``--model.engine fast`` -> ``model.engine.name``.
``fused_compiled`` (two switches in one value) is now ``impl: fused`` + ``compile: true``."""


def moved_key_message(key: str, value: object = None) -> str | None:
    """What to write instead of an old ``key`` (None: ``key`` did not move)."""
    if key in MOVED_KEYS:
        return f"{key} moved to {MOVED_KEYS[key]}"
    if key in GROUP_STRINGS and isinstance(value, str):
        if key == "model.train_forward" and value == "fused_compiled":
            new = "model.train_forward: {impl: fused, compile: true}"
        else:
            new = GROUP_STRINGS[key].format(value=value)
        return f"{key}={value!r} is a group now; write {new}"
    return None


def _group_types() -> dict[str, type]:
    """``model.<arg>`` -> its dataclass type, for every typed group of ``RLModule``
    (:data:`reclight.trainer.config.MODEL_GROUPS`; a test checks it against RLModule's signature)."""
    return {f"model.{name}": tp for name, tp in MODEL_GROUPS.items()}


def _choices(hint: Any) -> tuple[Any, ...] | None:
    """The accepted values of a ``Literal`` (or ``Optional[Literal]``) type hint; None for any other."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return typing.get_args(args[0]) + ((None,) if optional else ())
    return None


def unknown_field_message(key: str, value: object) -> str | None:
    """For a key inside a typed group that names no field (``model.engine.vllm.gpu_memory_utilisation``):
    the message naming the key, the value and the accepted fields of that group; for a field of
    ``Literal`` type given a value it does not accept (``model.algorithm.preset: rec_typo``): the
    message naming the accepted values (None: fine)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "model":
        return None
    tp = _group_types().get(".".join(parts[:2]))
    path = ".".join(parts[:2])
    for name in parts[2:]:
        if tp is None or not dataclasses.is_dataclass(tp):
            return None
        names = [f.name for f in dataclasses.fields(tp)]
        if name not in names:
            return f"{key}={value!r} is not valid: {path} has no field {name!r}; accepted: {', '.join(names)}"
        hint = typing.get_type_hints(tp)[name]
        choices = _choices(hint)
        if choices is not None and name == parts[-1] and not isinstance(value, dict) and value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            return f"{key}={value!r} is not valid; accepted: {shown}"
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        tp = args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None
        path = f"{path}.{name}"
    return None


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every node of a parsed YAML tree (groups and leaves)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key, v
            yield from _flatten(v, key)


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


CONFIG_ACCEPTED = "a YAML mapping of reclight fit settings, each key once (e.g. configs/arithmetic.yaml)"


def given_keys(args: list[str]) -> Iterator[tuple[str, Any]]:
    """The ``(key, value)`` pairs a command line sets, including those of its ``--config`` files,
    read with the one YAML loader (:mod:`reclight.trainer.yamlio`: an empty file, a list, a syntax
    error or a repeated key raises ``YamlFileError`` naming the file and line)."""
    for i, arg in enumerate(args):
        if arg == "-c":  # LightningCLI's short form of --config
            arg = "--config"
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        if key == "config" and value is not None:
            path = Path(value)
            yield from _flatten(load_yaml_file(path, "--config", CONFIG_ACCEPTED) if path.is_file() else _yaml(value))
        else:
            yield key.removesuffix("+"), _yaml(value) if isinstance(value, str) else value
            if isinstance(value, str) and isinstance(parsed := _yaml(value), dict):
                yield from _flatten(parsed, key)


def key_errors(args: list[str]) -> list[str]:
    """Messages for every key of ``args`` (and its config files) that moved to a typed group, or
    that names no field of its group (with the accepted fields)."""
    messages = []
    for key, value in given_keys(args):
        parts = key.split(".")
        found = None
        for n in range(1, len(parts) + 1):
            found = moved_key_message(".".join(parts[:n]), value if n == len(parts) else None)
            if found:
                break
        found = found or unknown_field_message(key, value)
        if found and found not in messages:
            messages.append(found)
    return messages
