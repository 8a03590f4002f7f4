"""The ``rizz`` command line: one table, subcommand -> function.

Each command is a plain Python function; its signature (types, defaults, docstring) *is* the CLI
and the YAML schema, through jsonargparse (litgpt-style). So

    rizz train --config configs/debug.yaml --train.steps 50 --model_config.d_model 128

loads the YAML, applies the dotted overrides, validates every key and type (an unknown key or a
wrong type fails with a message naming the key), prints the resolved config, and calls
``train(...)``. Functions are imported only when their command runs, so ``rizz --help`` is fast
and one broken extra cannot take the whole CLI down.
"""

from __future__ import annotations

import contextvars
import importlib
import json
import sys
from typing import Callable

# command -> ("module:function", one-line help). Two-word commands are subcommand groups.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rizzearch.training.recipes:train", "Pretrain a registered model (gpt, xlstm, rwkv) on a text corpus."),
    "generate": ("rizzearch.training.recipes:generate_text", "Generate text from a checkpoint (greedy, sampling or beam search)."),
    "eval": ("rizzearch.training.recipes:evaluate", "Validation loss, perplexity and bits-per-byte of a checkpoint on a text file."),
    "align": ("rizzearch.training.align:align", "Preference-align a model with ORPO, DPO or SFT (or SFT then DPO)."),
    "memorization": ("rizzearch.eval.memorization:memorization_command", "Audit how much of its training text a checkpoint regurgitates."),
    "rag index": ("rizzearch.rag.cli:index", "Build the legal RAG index (SQLite FTS5 + dense vectors) over the bundled corpus."),
    "rag ask": ("rizzearch.rag.cli:ask", "Answer a legal question with citations and the passages used."),
    "audit": ("rizzearch.audit.cli:audit", "Run the Magesh et al. hallucination audit over RAG systems and write a report."),
    "bench": ("rizzearch.bench:bench", "Run the speed benchmarks against the reference implementations."),
    "reproduce": ("rizzearch.reproduce.run:reproduce", "Reproduce the papers' main claims (all studies, or one) and write a report."),
}

# The resolved config of the running command (YAML text); run folders save it as config.yaml.
RESOLVED_CONFIG: contextvars.ContextVar[str | None] = contextvars.ContextVar("RESOLVED_CONFIG", default=None)


def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: rizz <command> [--config FILE.yaml] [--key value ...]",
        "",
        "rizzearch: xLSTM, RWKV-4, ORPO, Goldfish loss and a legal RAG hallucination audit.",
        "",
        "commands:",
    ]
    lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
    lines += ["", "Run `rizz <command> --help` for the options of one command.",
              "Every option can also come from a YAML file given with --config; later flags override it."]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return None, argv


def build_parser(command: str):
    """The jsonargparse parser of one command (its function's signature) -> (parser, function)."""
    from jsonargparse import ArgumentParser

    fn = _load(COMMANDS[command][0])
    parser = ArgumentParser(prog=f"rizz {command}", description=(fn.__doc__ or "").strip().split("\n\n")[0], exit_on_error=True)
    parser.add_argument("--config", action="config", help="YAML file with any of the options below.")
    parser.add_function_arguments(fn, fail_untyped=False, as_group=False)
    return parser, fn


def _positional_to_options(names: list[str], args: list[str], list_names: frozenset = frozenset()) -> list[str]:
    """A function may name parameters that can also be given positionally, in order
    (``rizz rag ask "QUESTION"``, ``rizz reproduce rwkv``); a list-typed last name takes every
    remaining value (``rizz bench rwkv xlstm``)."""
    values = []
    while args and not args[0].startswith("-"):
        values.append(args.pop(0))
    if len(values) > len(names) and not names:
        return values + args  # let the parser report the unexpected argument
    out = []
    for i, name in enumerate(names[: len(values)]):
        if i == len(names) - 1 and (len(values) > len(names) or name in list_names):
            out += [f"--{name}", "[" + ", ".join(json.dumps(v) for v in values[i:]) + "]"]
        else:
            out += [f"--{name}", values[i]]
    return out + args


def run_command(command: str, args: list[str]):
    """Parse ``args`` against the command's signature, print the resolved config, call it."""
    parser, fn = build_parser(command)
    import inspect

    lists = frozenset(n for n, prm in inspect.signature(fn).parameters.items() if "list" in str(prm.annotation))
    args = _positional_to_options(list(getattr(fn, "__positional__", ())), list(args), lists)
    from rizzearch.runs import check_config_args

    check_config_args(args)  # empty / non-UTF-8 / non-mapping YAML: one line naming the file
    cfg = parser.parse_args(args)
    resolved = parser.dump(cfg, skip_none=False)
    print(f"# rizz {command}: resolved config\n{resolved}", file=sys.stderr)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__default_config__")}
    token = RESOLVED_CONFIG.set(resolved)
    try:
        return fn(**kwargs)
    finally:
        RESOLVED_CONFIG.reset(token)


def main(argv: list[str] | None = None) -> int:
    from rizzearch.errors import RizzError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = _split_command(argv)
    if command is None:
        group = [c for c in COMMANDS if c.startswith(argv[0] + " ")]
        if group:
            print(f"rizz {argv[0]}: choose one of: {', '.join(c.split(' ', 1)[1] for c in group)}", file=sys.stderr)
        else:
            print(f"rizz: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        run_command(command, rest)
    except RizzError as e:
        print(f"rizz {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rizz {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
