"""docs/config.md, generated from the config dataclasses (``mlps config --reference``): every key
with its type, its default and the comment written beside (or above) its field in
mlps_dist/config.py, one table per section, each section introduced by its class docstring.

The comments are read from the module's source (the installed package ships it), so the
schema and its documentation are written once, in one place; a test checks that the file in
docs/ is what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import tokenize
import typing

HEADER = """# Configuration reference

Every key of the experiment YAML, generated from the dataclasses of `mlps_dist/config.py` by
`mlps config --reference > docs/config.md` (a test checks that this file is current). A key is
set in the YAML (`section: {key: value}`) or on the command line as a dotted override
(`classifier.epochs=3`); a key that does not exist is refused with the closest name. The
defaults below apply to every key a config leaves out; `configs/*.yaml` set the paper's and the
demo's values. `mlps config CONFIG [key=value ...]` prints a config resolved, `--get KEY` one
value, `--check` checks it against the models and the shards.
"""


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment on that line, without the ``#``."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


class FieldNotes:
    """The comment of every dataclass field in a module, by class and field name: the block of
    comment lines right above the field, then the comment at the end of its line(s)."""

    def __init__(self, module):
        source = inspect.getsource(module)
        lines = source.splitlines()
        comments = _comments(source)
        self.notes: dict[tuple[str, str], str] = {}
        self.docs: dict[str, str] = {}
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            self.docs[node.name] = ast.get_docstring(node) or ""
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                above, line = [], item.lineno - 1
                while line >= 1 and lines[line - 1].strip().startswith("#"):
                    above.insert(0, comments[line])
                    line -= 1
                trailing = [comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
                self.notes[(node.name, item.target.id)] = " ".join(above + trailing)

    def note(self, cls: type, name: str) -> str:
        """The field's comment in the class that defines it last, else in the first base that
        has one (a subclass that only changes a default keeps the base's explanation)."""
        for klass in cls.__mro__:
            text = self.notes.get((klass.__name__, name))
            if text:
                return text
        return ""

    def doc(self, cls: type) -> str:
        return " ".join(self.docs.get(cls.__name__, "").split())


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def format_value(value) -> str:
    """A value as it is written in the YAML and on the command line."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section(obj, path: str, notes: FieldNotes, out: list[str], note: str = "") -> None:
    """The table of ``obj``'s keys, then its sub-sections; ``note``: the comment of the field
    that holds it (``guard: ... # training health``)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    scalars, sections = [], []
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        (sections if dataclasses.is_dataclass(value) else scalars).append((f, value))
    title = f"`{path}`" if path else "Top level"
    intro = [text for text in (note, notes.doc(cls) if path else "") if text]
    out += [f"## {title}", ""] + [line for text in intro for line in (text, "")]
    if scalars:
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f, value in scalars:
            key = f"{path}.{f.name}" if path else f.name
            default = format_value(value)
            out.append(
                f"| `{key}` | {_cell(_type_name(hints[f.name]))} | "
                f"{'`' + _cell(default) + '`' if default else '(empty)'} | {_cell(notes.note(cls, f.name))} |"
            )
        out.append("")
    for f, value in sections:
        _section(value, f"{path}.{f.name}" if path else f.name, notes, out, notes.note(cls, f.name))


def reference() -> str:
    """The whole reference, as docs/config.md holds it."""
    from mlps_dist import config

    out = [HEADER]
    _section(config.Config(), "", FieldNotes(config), out)
    return "\n".join(out).rstrip("\n") + "\n"
