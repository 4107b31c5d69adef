"""Command line of the bench: ``python -m bandits {claims,exact}``.

Same style as the rest of the project: the typed dataclass :class:`bandits.config.ClaimsConfig`
(a docstring under every field) IS the CLI, through jsonargparse; YAML files are given with
``--config`` (repeatable; later files and flags override earlier ones)::

    python -m bandits claims --config configs/bandits/claims.yaml --seeds 64
    python -m bandits claims --config configs/bandits/claims.yaml --config configs/bandits/quick.yaml
    python -m bandits exact
"""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from bandits.config import ClaimsConfig

DESCRIPTION = (
    "Exact-optimum bandit bench for reclight: checks the surrogate-loss theory and the paper's "
    "claims (ALGORITHMS.md section 5) on tabular policies where the answer is known exactly."
)


def build_parser() -> ArgumentParser:
    """The ``python -m bandits`` parser, with the ``claims`` and ``exact`` subcommands."""
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
    return parser


def config_from_namespace(namespace) -> ClaimsConfig:
    """Build (and validate) the dataclass from the parsed ``claims`` namespace."""
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return ClaimsConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "exact":
        from bandits.claims import theory_checks
        from bandits.suite import claims_table

        rows = theory_checks()
        print("\n".join(claims_table(rows)))
        from bandits.claims import count_line

        print(count_line(rows))
        return 0 if all(r["holds"] for r in rows) else 1
    try:
        cfg = config_from_namespace(args.claims)
    except ValueError as err:
        parser.error(str(err))
    from bandits.suite import run_claims

    run_claims(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
