"""Command line of the bench: ``python -m bandits {claims,exact,async}``.

Same style as the rest of the project: the typed dataclass :class:`bandits.config.ClaimsConfig`
(a docstring under every field) IS the CLI, through jsonargparse; YAML files are given with
``--config`` (repeatable; later files and flags override earlier ones)::

    python -m bandits claims --config configs/bandits/claims.yaml --seeds 64
    python -m bandits claims --config configs/bandits/claims.yaml --config configs/bandits/quick.yaml
    python -m bandits exact
    python -m bandits async --config configs/bandits/async/default.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from bandits.config import AsyncBenchConfig, ClaimsConfig
from reclight.yamlio import YamlFileError, load_yaml_file

DESCRIPTION = (
    "Exact-optimum bandit bench for reclight: checks the surrogate-loss theory and the paper's "
    "claims (docs/algorithms.md section 5) on tabular policies where the answer is known exactly."
)


def wants_help(argv: list[str]) -> bool:
    """Whether a command line asks for ``--help`` (then the fields' docstrings are read)."""
    return any(a in ("-h", "--help") for a in argv)


def build_parser(field_docs: bool = False) -> ArgumentParser:
    """The ``python -m bandits`` parser, with the ``claims``, ``exact`` and ``async`` subcommands.

    ``field_docs``: read every field's docstring for the help text. Only for ``--help``: it is a
    process-wide jsonargparse setting that makes every later parse (any jsonargparse parser in the
    process, LightningCLI's included) several times slower (0.2 s -> 2.4 s per reclight CLI parse
    in the test suite, which runs both CLIs in one process)."""
    if field_docs:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="python -m bandits", description=DESCRIPTION)
    subcommands = parser.add_subcommands(dest="command")

    claims = ArgumentParser(
        description="Run every preset x off-policy setting x environment with vectorized seeds "
        "and write the claims report (claims.md), summary.json and one reward plot per setting."
    )
    claims.add_argument("--config", action=ActionConfigFile, help="YAML file(s) of ClaimsConfig fields.")
    claims.add_class_arguments(ClaimsConfig, fail_untyped=True)
    subcommands.add_subcommand("claims", claims, help="run the whole claims suite and write the report")

    exact = ArgumentParser(description="Print the exact theory checks (3-arm counterexample).")
    subcommands.add_subcommand("exact", exact, help="print the exact theory checks only (seconds)")

    async_ = ArgumentParser(
        description="Train chain prompts of different horizons under the asynchronous schedules of "
        "reclight.clock (sync, pace, drop, none) and write async.md: the schedules, the training results "
        "and the exact expected-gradient tables (docs/async.md)."
    )
    async_.add_argument("--config", action=ActionConfigFile, help="YAML file(s) of AsyncBenchConfig fields.")
    async_.add_class_arguments(AsyncBenchConfig, fail_untyped=True)
    subcommands.add_subcommand("async", async_, help="the asynchronous schedules on the simulated clock (~1 min)")
    return parser


def config_from_namespace(namespace, cls: type = ClaimsConfig):
    """Build (and validate) the dataclass ``cls`` from a parsed subcommand's namespace."""
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return cls(**values)


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` values of a command line that are files (jsonargparse also takes inline YAML)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return [v for v in values if Path(v).is_file()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(field_docs=wants_help(argv))
    try:  # file and line of a YAML error, a repeated key refused (jsonargparse keeps the last one silently)
        for path in config_files(argv):
            load_yaml_file(path, "--config", "a YAML mapping of bench fields, each key once (e.g. "
                           "configs/bandits/claims.yaml)")
    except YamlFileError as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    if args.command == "exact":
        from bandits.claims import theory_checks
        from bandits.suite import claims_table

        rows = theory_checks()
        print("\n".join(claims_table(rows)))
        from reclight.stats import count_line

        print(count_line(rows))
        return 0 if all(r["holds"] for r in rows) else 1
    if args.command == "async":
        try:
            cfg = config_from_namespace(args["async"], AsyncBenchConfig)
        except ValueError as err:
            parser.error(str(err))
        from bandits.async_suite import run_async_bench

        run_async_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
        return 0
    try:
        cfg = config_from_namespace(args.claims)
    except ValueError as err:
        parser.error(str(err))
    from bandits.suite import run_claims

    run_claims(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
