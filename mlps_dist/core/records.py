"""Nested records (config sections, input records, settings) as flat dotted keys, so that
two records compare key by key and a difference is named as the config names it.

``changed`` is the one diff of every provenance record: a stage's stamp and a training
checkpoint's inputs (mlps_dist.run.artifacts) and the pseudo-mask manifest
(mlps_dist.data.pseudo_masks), with one rule for a key the older record lacks."""

from __future__ import annotations


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values stay as they are."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


UNSET = "<unset>"  # how a key one record lacks (and no default fills) is shown


def _plain(value):
    """Tuples compare as the lists a JSON record holds."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def changed(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """What differs between two records: {dotted key: (old value, new value)}, sorted by key.

    A key of ``new`` that ``old`` lacks but ``defaults`` (flat, dotted) holds was added after
    ``old`` was written: the program behaved then as that default does now, so ``old`` counts
    as having it (a key whose default changes is a new key). Any other missing value is UNSET.
    """
    a, b = flatten(old or {}), flatten(new or {})
    for key in b:
        if key not in a and key in (defaults or {}):
            a[key] = defaults[key]
    return {
        key: (a.get(key, UNSET), b.get(key, UNSET))
        for key in sorted(set(a) | set(b))
        if _plain(a.get(key, UNSET)) != _plain(b.get(key, UNSET))
    }
