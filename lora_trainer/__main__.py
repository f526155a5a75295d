"""Command line: ``python -m lora_trainer <command> ...``.

Commands:

- ``inspect FILE [--json]``: describe a LoRA file (ours, kohya's or LyCORIS's): family, network
  type, ranks and alphas per group, keys that match no module, metadata summary, hashes.

Each command is a ``register_*`` function in :data:`COMMANDS` that adds its subparser and sets
``handler`` to a function ``(args) -> exit code``; a handler imports what it needs itself, so
``--help`` stays light. Errors derived from ``LoraTrainerError`` are printed as one
``error: ...`` line with exit code 1; argparse usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from lora_trainer import __version__
from lora_trainer.errors import LoraTrainerError

EXIT_OK = 0
EXIT_ERROR = 1  # a LoraTrainerError: bad file, bad config ...
# argparse exits with 2 on usage errors


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="describe a LoRA file (family, network type, ranks/alphas, metadata, hashes)",
        description="Read a LoRA .safetensors file (ours, kohya's or LyCORIS's) and describe it.",
    )
    p.add_argument("file", metavar="FILE", help="the .safetensors file")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from lora_trainer.files.inspection import format_report, inspect_lora

    report = inspect_lora(args.file)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return EXIT_OK


# The commands, in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [register_inspect]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="sd-webui-lora-train tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse may raise SystemExit(2) on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or EXIT_OK)
    except LoraTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
