"""`ssmtune <command> [options]`: the commands are a dict of typed functions (litgpt style).

Each function takes one argument dataclass, parsed from flags and an optional `--recipe file.yaml`;
`demo` receives the raw arguments.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any

import yaml

from ssmtune.cli import commands
from ssmtune.cli import serve as serve_cli

COMMANDS: dict[str, Callable[..., Any]] = {
    "train": commands.train,
    "eval": commands.eval,
    "generate": commands.generate,
    "compare": commands.compare,
    "pretrain": commands.pretrain,
    "bench": commands.bench,
    "serve": serve_cli.serve,
    "demo": commands.demo,
}


# Commands that continue from their checkpoints when rerun after an interruption.
RESUMABLE = ("train", "compare", "pretrain")


def arg_type(fn: Callable[..., Any]) -> Any:
    """The type of a command function's single parameter."""
    hints = typing.get_type_hints(fn)
    hints.pop("return", None)
    (tp,) = hints.values()
    return tp


def _usage() -> str:
    lines = ["usage: ssmtune <command> [options]   (ssmtune <command> --help for the options)", "", "commands:"]
    for name, fn in COMMANDS.items():
        lines.append(f"  {name:<10} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ssmtune.cli.args import parse
    from ssmtune.train.loop import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ssmtune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    fn = COMMANDS[name]
    tp = arg_type(fn)
    if tp == list[str]:
        out = fn(rest)
        return out if isinstance(out, int) else 0
    epilog = ""
    if name == "train":
        try:
            epilog = "methods: " + ", ".join(commands.method_names())
        except (ImportError, ValueError) as e:  # the registry is optional for --help
            epilog = f"methods: unavailable ({e})"
        epilog += "\nexample: ssmtune train --recipe recipes/mamba-130m/rte/state_offset_h.yaml --train.epochs 1"
    try:
        args = parse(tp, rest, prog=f"ssmtune {name}", epilog=epilog)
        out = fn(args)
    except KeyboardInterrupt:
        again = "; rerun the same command to resume" if name in RESUMABLE else ""
        print(f"ssmtune {name}: interrupted{again}", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        print(f"ssmtune {name}: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError, yaml.YAMLError) as e:
        # a user error (a bad value, a path that is missing, a folder, or not writable): one line, no traceback
        print(f"ssmtune {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
