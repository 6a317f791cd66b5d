"""Every command in the README and docs/ names something that exists, with flags it takes;
every link between them resolves.

The ```bash blocks of README.md and docs/*.md are read line by line (backslash continuations
joined, comments dropped, ``VAR=value`` prefixes skipped). A line that names a project entry
point is checked:

- ``mlps CMD ...`` / ``torchrun ... -m mlps_dist -- CMD ...``: CMD is a command of the
  dispatcher's table (mlps_dist.cli.COMMANDS), its module exists, and every ``--flag`` of the
  line appears in ``mlps CMD --help``; under torchrun a ``--`` comes before CMD (torchrun's own
  parser would take ``--run`` for its ``--run-path``);
- ``python -m mlps_dist.X ...``: the module exists, and its flags appear in its ``--help``;
- ``python tools/X.py``, ``bash tools/X.sh``, ``source tools/venv.sh``, ``launch/X.sh``,
  ``slurm/X``: the file exists.

The cheap commands are run as written (``mlps --help``, ``mlps --version``, ``mlps config
...``): exit status 0 and the output they promise. Help texts are read in this process (one
import of each command's module), so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI_EXISTS = (REPO / "mlps_dist" / "__main__.py").is_file()
NO_CLI = "mlps_dist/__main__.py does not exist yet: only files and modules are checked, not the flags"
FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.S | re.M)
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    where: str  # README.md:42
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def bash_commands() -> list[Command]:
    """Every command line of every ```bash block, as shell words without comments."""
    commands = []
    for path in DOCS:
        text = path.read_text()
        for block in FENCE.finditer(text):
            first = text.count("\n", 0, block.start(1)) + 1
            pending, start = "", first
            for offset, line in enumerate(block.group(1).splitlines()):
                if not pending:
                    start = first + offset
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                words = shlex.split(pending + line, comments=True)
                pending = ""
                while words and ENV_PREFIX.match(words[0]):
                    words = words[1:]
                if words:
                    commands.append(Command(f"{path.relative_to(REPO)}:{start}", tuple(words)))
    return commands


def entry_point(words: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """(kind, name, arguments) of a line naming a project entry point, else None.

    kind: "mlps" (name = the subcommand), "module" (python -m), "file" (a script path)."""
    head = words[0]
    if head == "mlps":
        if len(words) == 1 or words[1].startswith("-"):
            return "mlps", "", list(words[1:])
        return "mlps", words[1], list(words[2:])
    if head == "torchrun" and "-m" in words:
        i = words.index("-m")
        if words[i + 1] == "mlps_dist":
            rest = list(words[i + 2 :])
            if rest[:1] != ["--"]:
                return "torchrun-without-separator", " ".join(rest[:1]), rest
            return "mlps", rest[1], rest[2:]
        return "module", words[i + 1], list(words[i + 2 :])
    if head in ("python", "python3") and len(words) > 2 and words[1] == "-m" and words[2].startswith("mlps_dist"):
        if words[2] == "mlps_dist":
            return "mlps", words[3] if len(words) > 3 else "", list(words[4:])
        return "module", words[2], list(words[3:])
    if head in ("python", "python3", "bash", "source", "sbatch"):
        scripts = [w for w in words[1:] if re.match(r"^(tools|launch|slurm)/", w)]
        return ("file", scripts[0], []) if scripts else None
    if re.match(r"^(tools|launch|slurm)/", head):
        return "file", head, []
    return None


COMMANDS = [c for c in bash_commands() if entry_point(c.words)]


def flags(arguments: list[str]) -> list[str]:
    """The long options of a command line, without values (``--out=x`` -> ``--out``); nothing
    after a bare ``--``."""
    found = []
    for word in arguments:
        if word == "--":
            break
        if word.startswith("--"):
            found.append(word.split("=", 1)[0])
    return found


def dispatcher_table() -> dict:
    from mlps_dist.cli import COMMANDS as table

    return table


@cache
def help_text(kind: str, name: str) -> str:
    """``--help`` of an mlps subcommand or a module, read in this process."""
    if kind == "mlps":
        from mlps_dist.__main__ import main

        call = (lambda: main([name, "--help"])) if name else (lambda: main(["--help"]))
    else:
        module = importlib.import_module(name)
        call = lambda: module.main(["--help"])  # noqa: E731
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = call()
        except SystemExit as exc:
            status = exc.code
    assert status in (0, None), f"{kind} {name} --help exited {status}:\n{out.getvalue()}"
    return out.getvalue()


def test_the_docs_have_commands():
    """The extraction finds the README's commands (a broken fence pattern would pass all)."""
    readme = [c.text for c in COMMANDS if c.where.startswith("README.md")]
    assert any(t.startswith("bash launch/demo.sh") for t in readme), readme
    assert any(t.startswith("mlps pipeline ") for t in readme), readme
    assert len(COMMANDS) >= 30, [c.text for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {' '.join(c.words[:2])}" for c in COMMANDS])
def test_command_names_what_exists(command: Command):
    kind, name, arguments = entry_point(command.words)
    assert kind != "torchrun-without-separator", (
        f"{command.where}: `{command.text}`: put -- before the command (torchrun -m mlps_dist -- {name} ...)"
    )
    if kind == "file":
        assert (REPO / name).is_file(), f"{command.where}: `{command.text}`: no file {name}"
        return
    if kind == "module":
        assert importlib.util.find_spec(name) is not None, f"{command.where}: `{command.text}`: no module {name}"
    if kind == "mlps" and name:
        if not CLI_EXISTS:
            pytest.skip(NO_CLI)
        table = dispatcher_table()
        assert name in table, f"{command.where}: `{command.text}`: mlps has no command {name!r} ({', '.join(table)})"
        module = table[name][0]
        assert importlib.util.find_spec(module) is not None, (
            f"{command.where}: `{command.text}`: the module of mlps {name}, {module}, does not exist"
        )
    if kind == "mlps" and not CLI_EXISTS:
        pytest.skip(NO_CLI)
    wanted = flags(arguments)
    if not wanted:
        return
    text = help_text(kind, name)
    missing = [f for f in wanted if not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"{command.where}: `{command.text}`: {', '.join(missing)} not in its --help"


def run_mlps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlps_dist", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


CHEAP = [
    c
    for c in COMMANDS
    if c.words[0] == "mlps" and (c.words[1:] in (("--help",), ("--version",)) or c.words[1] == "config")
]


def test_cheap_commands_are_in_the_docs():
    assert {c.words[1] for c in CHEAP} >= {"--help", "--version", "config"}, [c.text for c in CHEAP]


@pytest.mark.skipif(not CLI_EXISTS, reason=NO_CLI)
@pytest.mark.parametrize("command", CHEAP, ids=[f"{c.where} {c.text}" for c in CHEAP])
def test_cheap_commands_run_as_written(command: Command):
    done = run_mlps(*command.words[1:])
    assert done.returncode == 0, f"{command.where}: `{command.text}` exited {done.returncode}:\n{done.stderr}"
    if command.words[1] == "--version":
        assert re.fullmatch(r"mlps-dist \d+\.\d+\S*\n", done.stdout), done.stdout
    elif command.words[1] == "--help":
        assert "pipeline" in done.stdout and "segment" in done.stdout, done.stdout
    else:  # mlps config CONFIG key=value ...: the resolved config, with the overrides in it
        import yaml

        resolved = yaml.safe_load(done.stdout)
        for override in (w for w in command.words[3:] if "=" in w):
            key, value = override.split("=", 1)
            node = resolved
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, f"{command.where}: {key} printed as {node!r}, not {value}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.*)$", path.read_text(), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def test_links_between_the_docs_resolve():
    """Every relative link of the README and docs/ names a file that exists, and a heading of it."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
