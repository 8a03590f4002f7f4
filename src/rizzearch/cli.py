"""The ``rizz`` command line: one table, subcommand -> function.

Each command is a plain Python function; its signature (types, defaults, docstring) *is* the CLI
and the YAML schema, through jsonargparse (litgpt-style). So

    rizz train --config configs/debug.yaml --train.steps 50 --model_config.d_model 128

loads the YAML, applies the dotted overrides, validates every key and type (an unknown key or a
wrong type fails with a message naming the key), prints the resolved config, and calls
``train(...)``. Functions are imported only when their command runs, so ``rizz --help`` is fast
and one broken extra cannot take the whole CLI down.

Two tables beside the signatures: ``POSITIONALS`` names the parameters that may also be given
positionally, anywhere among the options (``rizz rag ask --k 6 "QUESTION"``); and a
``model_config`` parameter next to ``model`` is typed by that registered model's config dataclass
(``--model_config.d_model abc`` fails naming ``model_config.d_model``), so a newly registered model
needs no change here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from typing import Callable

# command -> ("module:function", one-line help). Two-word commands are subcommand groups.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rizzearch.training.recipes:train", "Pretrain a registered model (gpt, xlstm, rwkv) on a text corpus."),
    "generate": ("rizzearch.training.recipes:generate_text", "Generate text from a checkpoint (greedy, sampling or beam search)."),
    "chat": ("rizzearch.training.chat:chat", "Chat with a model (--init smollm2, an HF folder, a .gguf or a run) using its chat template."),
    "export": ("rizzearch.training.recipes:export", "Write a checkpoint as an HF model folder (--format hf) that transformers loads."),
    "eval": ("rizzearch.training.recipes:evaluate", "Validation loss, perplexity and bits-per-byte of a checkpoint on a text file."),
    "align": ("rizzearch.training.align:align", "Preference-align a model with ORPO, DPO or SFT (or SFT then DPO)."),
    "import": ("rizzearch.training.importer:import_checkpoint", "Turn an HF folder, .gguf, RWKV-4 .pth, official xLSTM folder (or smollm2) into a rizzearch run folder."),
    "memorization": ("rizzearch.eval.memorization:memorization_command", "Audit how much of its training text a checkpoint regurgitates."),
    "rag index": ("rizzearch.rag.cli:index", "Build the legal RAG index (SQLite FTS5 + dense vectors) over the bundled corpus."),
    "rag ask": ("rizzearch.rag.cli:ask", "Answer a legal question with citations and the passages used."),
    "audit": ("rizzearch.commands.audit:audit", "Run the Magesh et al. hallucination audit over RAG systems and write a report."),
    "audit agreement": ("rizzearch.audit.agreement:agreement_command", "Cohen's kappa of our labeller against expert labels (reglab/legal_rag_hallucinations CSVs)."),
    "bench": ("rizzearch.bench:bench", "Run the speed benchmarks against the reference implementations."),
    "reproduce": ("rizzearch.reproduce.run:reproduce", "Reproduce the papers' main claims (all studies, or one) and write a report."),
}


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


# command -> parameters that may also be given positionally, in order, anywhere among the options
# (``rizz rag ask "QUESTION" --k 6``, ``rizz reproduce rwkv``, ``rizz bench rwkv xlstm``, ``rizz
# generate RUN --prompt ...``). Each keeps its ``--name`` form (and its YAML key); a list-typed last
# one takes every remaining value.
POSITIONALS: dict[str, tuple[str, ...]] = {
    "rag ask": ("question",),
    "import": ("source",),
    "generate": ("checkpoint",),
    "chat": ("checkpoint",),
    "eval": ("checkpoint",),
    "export": ("checkpoint",),
    "memorization": ("checkpoint",),
    "reproduce": ("study",),
    "bench": ("names",),
}


# A parameter of this name, in a command that also takes ``model``, is typed by the registered
# config dataclass of that model (``--model_config.d_model 128``, YAML ``model_config: {d_model: 128}``).
MODEL_CONFIG = "model_config"
# the model a command builds when --model is unset and no --init source fixes it (train, align)
DEFAULT_MODEL = "gpt"


class _Positional(argparse.Action):
    """A positional that shares its destination with the ``--name`` option of the same parameter.

    When the positional is absent it leaves the option's (or the YAML file's) value alone; when it
    is given, the value is validated by the parameter's type like the option's.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None or values == []:
            return
        setattr(namespace, self.dest, values)


def _is_list(annotation) -> bool:
    """Is the annotation a list/tuple type (or an optional one)?"""
    import typing

    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _takes_model_config(fn: Callable) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return MODEL_CONFIG in params and "model" in params


def build_parser(command: str, model: str | None = None):
    """The jsonargparse parser of one command (its function's signature) -> (parser, function).

    With ``model`` (a registered name), a ``model_config`` parameter is typed by that model's
    config dataclass (every field optional: ``models.base.config_overrides_type``), so each key
    and value is validated like any other option.
    """
    import typing

    from jsonargparse import ArgumentParser

    fn = _load(COMMANDS[command][0])
    parser = ArgumentParser(prog=f"rizz {command}", description=(fn.__doc__ or "").strip().split("\n\n")[0], exit_on_error=True)
    parser.add_argument("--config", action="config", help="YAML file with any of the options below.")
    typed = model is not None and _takes_model_config(fn)
    parser.add_function_arguments(fn, fail_untyped=False, as_group=False, skip={MODEL_CONFIG} if typed else None)
    if typed:
        from rizzearch.models.base import config_overrides_type, get_model_class

        parser.add_class_arguments(config_overrides_type(get_model_class(model)[1]), MODEL_CONFIG,
                                   help=f"overrides of the {model!r} model's config (unset keys keep its defaults)")
    hints = typing.get_type_hints(fn)
    names = POSITIONALS.get(command, ())
    for i, name in enumerate(names):
        many = _is_list(hints.get(name)) and i == len(names) - 1
        parser.add_argument(name, nargs="*" if many else "?", default=None, action=_Positional, metavar=name.upper(),
                            help=f"the same as --{name}, given positionally")
    return parser, fn


def _model_in_argv(args: list[str]) -> str | None:
    """The value of ``--model`` on the command line (for --help, before anything is parsed)."""
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None


def _bare_flags(fn: Callable, args: list[str]) -> list[str]:
    """``--flag`` of a bool parameter given without a value means ``--flag true`` (``rizz generate --chat``)."""
    import typing

    hints = typing.get_type_hints(fn)
    out = []
    for i, a in enumerate(args):
        out.append(a)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a.startswith("--") and hints.get(a[2:]) is bool and (nxt is None or nxt.startswith("--")):
            out.append("true")
    return out


def parse_command(command: str, args: list[str]):
    """Parse ``args`` against the command's signature -> (parser, function, namespace).

    A command with ``model`` and ``model_config`` parameters is parsed twice: once to learn the
    model name (from --model, the YAML file or the default), then with ``model_config`` typed by
    that registered model's config (so a model registered later needs no CLI change).
    """
    parser, fn = build_parser(command)
    args = _bare_flags(fn, args)
    if _takes_model_config(fn) and any(a in ("-h", "--help") for a in args):
        parser, fn = build_parser(command, model=_model_in_argv(args) or parser.get_defaults().get("model") or DEFAULT_MODEL)
    cfg = parser.parse_args(list(args))
    model = cfg.get("model") or (None if cfg.get("init") else DEFAULT_MODEL)
    if _takes_model_config(fn) and model is not None:
        parser, fn = build_parser(command, model=model)
        cfg = parser.parse_args(list(args))
    return parser, fn, cfg


def run_command(command: str, args: list[str]):
    """Parse ``args`` against the command's signature, print the resolved config, call it."""
    from rizzearch.runs import RESOLVED_CONFIG, check_config_args

    check_config_args(args)  # empty / non-UTF-8 / non-mapping YAML: one line naming the file
    parser, fn, cfg = parse_command(command, args)
    resolved = parser.dump(cfg, skip_none=False)
    print(f"# rizz {command}: resolved config\n{resolved}", file=sys.stderr)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__default_config__")}
    if _takes_model_config(fn):
        from rizzearch.models.base import overrides_to_dict

        kwargs[MODEL_CONFIG] = overrides_to_dict(kwargs.get(MODEL_CONFIG)) or None
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
