"""Command line: ``python -m lora_trainer <command> ...``.

Commands:

- ``inspect FILE [--json]``: describe a LoRA file (ours, kohya's or LyCORIS's): family, network
  type, ranks and alphas per group, keys that match no module, metadata summary, hashes.
- ``train CONFIG.toml --checkpoint MODEL.safetensors ...``: train a LoRA on a single-file SD1/SD2/SDXL
  checkpoint without the WebUI (needs the ``train`` extra; see
  :mod:`lora_trainer.backends.checkpoint.command`). Several GPUs: ``accelerate launch -m lora_trainer train ...``.

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


def register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a LoRA on a checkpoint file, without the WebUI",
        description="Train a LoRA on a single-file SD1, SD2 or SDXL checkpoint (.safetensors) as the tab would, "
        "with the settings of CONFIG (our TOML, as the tab saves it, or a kohya --config_file TOML). Options "
        "given here replace the file's. Ctrl-C stops and saves what was trained (continue with --resume); "
        "a second Ctrl-C aborts. Several GPUs: accelerate launch -m lora_trainer train ...",
    )
    p.add_argument("config", metavar="CONFIG.toml", help="the settings: our TOML or a kohya TOML")
    p.add_argument(
        "--checkpoint",
        metavar="MODEL",
        help="the SD1/SD2/SDXL checkpoint (.safetensors); default: the kohya TOML's pretrained_model_name_or_path",
    )
    p.add_argument("--vae", metavar="FILE", help="a separate VAE file (default: the checkpoint's own VAE)")
    p.add_argument("--output-dir", metavar="DIR", help="folder the LoRA is written to (replaces output_dir)")
    p.add_argument("--output-name", metavar="NAME", help="file name without extension (replaces output_name)")
    p.add_argument(
        "--work-dir", metavar="DIR", help="latent caches, resume states and logs (default: OUTPUT_DIR/.lora-train)"
    )
    p.add_argument("--resume", action="store_true", help="continue the stopped run of the same output name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of the same name")
    p.add_argument(
        "--v-parameterization",
        action="store_true",
        help="the model predicts v (SD2 768-v); default: from the checkpoint, or the kohya TOML's v_parameterization",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="also read .ckpt/.pt (pickle) files; only files you trust"
    )
    p.add_argument("--device", metavar="cpu|cuda|cuda:N", help="where to train (default: the first GPU, else the CPU)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="precision the model is held in (default auto: fp32 on the CPU, fp16 on a GPU); the LoRA trains in "
        "fp32 under the config's mixed_precision",
    )
    p.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="ignore settings the config file holds that this trainer does not know (default: an error naming them)",
    )
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from lora_trainer.backends.checkpoint.command import run

    return run(args)


# The commands, in the order `--help` lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [register_inspect, register_train]


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
