"""``mlps CMD ARGS...`` = ``python -m mlps_dist CMD ARGS...`` = ``torchrun ... -m mlps_dist CMD ARGS...``.

The command's module (mlps_dist.cli.COMMANDS) is imported only when it runs, so ``mlps --help``
and ``mlps --version`` load neither torch nor numpy. Under torchrun put ``--`` before the
command (``torchrun --nproc_per_node=4 -m mlps_dist -- infer --run RUN ...``): torchrun's own
parser takes a bare ``--run`` after the module for its ``--run-path`` and stops; a ``--`` right
before or right after the command is dropped here.
"""

from __future__ import annotations

import importlib
import sys

from mlps_dist import __version__
from mlps_dist.cli import COMMANDS

EXIT_USAGE = 2


def summary(name: str) -> str:
    """The command's one-line help: the table's, else its module's ``HELP``."""
    module, text = COMMANDS[name]
    if text:
        return text
    try:
        return getattr(importlib.import_module(module), "HELP", "")
    except ImportError as exc:
        return f"(not available here: {exc})"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: mlps [--version] [--help] COMMAND [ARGS...]   (mlps COMMAND --help: its flags and defaults)",
        "",
        "commands:",
    ]
    lines += [f"  {name:{width}s}  {summary(name)}" for name in COMMANDS]
    lines += [
        "",
        "The same as python -m mlps_dist COMMAND ...; on several GPUs: "
        "torchrun --nproc_per_node=N -m mlps_dist -- COMMAND ...",
    ]
    return "\n".join(lines)


def load(name: str):
    """The ``main`` of a command's module; a module that is not there (a command not built yet,
    a missing optional package) is named in one line, exit 2."""
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if exc.name == module:
            print(f"mlps {name}: not available in this installation (no module {module})", file=sys.stderr)
        else:
            print(
                f"mlps {name}: needs the Python package '{exc.name}', which is not installed (see the extras "
                f"in pyproject.toml: pip install 'mlps-dist[...]')",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_USAGE) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help") and not rest:
        print(usage())
        return 0
    if command in ("-V", "--version"):
        print(f"mlps-dist {__version__}")
        return 0
    if command not in COMMANDS:
        print(f"mlps: unknown command '{command}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    if rest[:1] == ["--"]:
        rest = rest[1:]
    status = load(command)(rest)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
