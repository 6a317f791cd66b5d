"""Nested records (config sections, input records, settings) as flat dotted keys, so that
two records compare key by key and a difference is named as the config names it."""

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
