"""Annotation class names -> dataset classes: the ``--class-map`` of mlps tile.

    class_map = parse_class_map("Tumor=TE,Stroma*=TAS,Other=ignore,Region*=ignore", ["TE", "NEC", "LYM", "TAS"])
    class_map.lookup("Stroma (dense)")     # 3
    class_map.lookup("Region*")            # IGNORE
    class_map.lookup("Fat")                # None: unmapped, an error for the caller to report

Entries are ``NAME=TARGET`` separated by commas. TARGET is one of the classes or ``ignore``
(the region is left out of labels and carries the ignore index in masks). NAME is an exact
name, or a pattern when it holds ``*``, ``?`` or ``[`` (fnmatch: ``*`` any run of characters,
``?`` one character, ``[abc]`` one of a set); QuPath's own ``Region*`` and ``Ignore*`` classes
are matched by the patterns of the same spelling. Matching ignores case throughout.

A name is looked up in this order, the first hit wins: the exact entries, then the class
names themselves (``TE`` maps to TE without being listed), then the patterns in the order
given. So ``"Tumor*=TE,*=ignore"`` maps every other name to ignore, but never a class name.
The same exact name given two different targets is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from mlps_dist.core.errors import InputError

IGNORE = -1  # target index of an ``ignore`` entry
IGNORE_NAME = "ignore"
PATTERN_CHARS = "*?["


@dataclass
class ClassMap:
    """Lower-case exact names and patterns -> class index (``IGNORE`` for ignore)."""

    classes: list[str]
    exact: dict[str, int] = field(default_factory=dict)
    patterns: list[tuple[str, int]] = field(default_factory=list)

    def lookup(self, name: str) -> int | None:
        key = name.lower()
        if key in self.exact:
            return self.exact[key]
        for c, cls in enumerate(self.classes):
            if cls.lower() == key:
                return c
        for pattern, target in self.patterns:
            if fnmatch.fnmatchcase(key, pattern):
                return target
        return None

    def target_name(self, index: int) -> str:
        return IGNORE_NAME if index == IGNORE else self.classes[index]

    def record(self) -> dict:
        """The mapping as written to info.json: {"exact": {name: target}, "patterns": [[pattern, target]]}."""
        return {
            "exact": {n: self.target_name(t) for n, t in sorted(self.exact.items())},
            "patterns": [[p, self.target_name(t)] for p, t in self.patterns],
        }


def is_pattern(name: str) -> bool:
    return any(ch in name for ch in PATTERN_CHARS)


def parse_class_map(spec: str | None, classes: list[str]) -> ClassMap:
    """``"Tumor=TE,Region*=ignore"`` -> ClassMap (see the module docstring)."""
    index = {c.lower(): i for i, c in enumerate(classes)}
    if IGNORE_NAME in index:
        raise InputError(
            f"--classes {','.join(classes)}: a class may not be called {IGNORE_NAME!r} (it is the "
            f"--class-map target that leaves a region out); rename it"
        )
    mapping = ClassMap(list(classes))
    targets = f"one of {classes} or {IGNORE_NAME!r}"
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, sep, target = item.partition("=")
        name, target = name.strip().lower(), target.strip().lower()
        if not sep or not name or (target not in index and target != IGNORE_NAME):
            raise InputError(f"--class-map entry {item!r}: expected NAME=TARGET with TARGET {targets}")
        value = IGNORE if target == IGNORE_NAME else index[target]
        if is_pattern(name):
            mapping.patterns.append((name, value))
        elif mapping.exact.get(name, value) != value:
            raise InputError(
                f"--class-map: {name!r} is mapped twice, to {mapping.target_name(mapping.exact[name])} "
                f"and to {mapping.target_name(value)}; keep one entry"
            )
        else:
            mapping.exact[name] = value
    return mapping


def as_class_map(class_map, classes: list[str]) -> ClassMap:
    """A ClassMap from a ClassMap or a plain {lower-case name: index} dict (older callers)."""
    if isinstance(class_map, ClassMap):
        return class_map
    return ClassMap(list(classes), exact={str(k).lower(): int(v) for k, v in dict(class_map or {}).items()})
