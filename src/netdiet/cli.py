"""The command line: the only place that parses arguments and prints. Thin over `netdiet.api`.

Each command is a function decorated with `@command` that adds its sub-parser and sets `func`.
Exit codes: 0 success, 2 bad input (one line, no traceback unless --debug), 1 internal error.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from rich.console import Console

from netdiet.errors import NetdietError

console = Console()
err_console = Console(stderr=True)
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
    _COMMANDS.append(fn)
    return fn


# ------------------------------------------------------------------ shared option helpers
def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH (atomically)")


def add_seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result; default 0)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (`netdiet models`), package.module:callable or path/file.py:callable")
    p.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                   help="argument for the model factory (repeatable), e.g. --model-kw depth=20")


def add_data_options(p: argparse.ArgumentParser, default: str | None = "mnist5k") -> None:
    p.add_argument("--data", default=default, help=f"dataset name (`netdiet data --list`; default {default})")
    p.add_argument("--data-dir", default=None, help="folder with IDX files for mnist / fashion-mnist")


def write_json(args: argparse.Namespace, doc: dict) -> None:
    if getattr(args, "json", None):
        from netdiet.fileio import atomic_write_json
        atomic_write_json(args.json, doc)
        err_console.print(f"[dim]wrote {args.json}[/dim]")


# ==================================================================== models
@command
def _models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo: name, parameters, default input")
    add_json_option(p)
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from netdiet import api
    from netdiet.report.terminal import models_table
    rows = api.list_models()
    console.print(models_table(rows))
    write_json(args, {"schema": "netdiet.models/1", "models": rows})
    return 0


# ==================================================================== data
# (the data command is added in the analysis section below)

# ==================================================================== profile

# ==================================================================== compress / evaluate

# ==================================================================== train / sweep

# ==================================================================== continual

# ==================================================================== report / demo


# ==================================================================== entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netdiet", description="What your neural network really costs, and how to make it cheaper.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from netdiet import __version__
    parser.add_argument("--version", action="version", version=f"netdiet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except NetdietError as exc:
        if debug:
            traceback.print_exc()
        print(f"netdiet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netdiet: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            traceback.print_exc()
        print(f"netdiet: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
