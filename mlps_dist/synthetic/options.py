"""How the synthetic H&E generator varies its data, and the named variants.

    opts = variant_options("pale", h_strength=0.6)      # a variant, one value overridden
    opts.size, opts.as_dict()                           # patch size; JSON form (in synthetic.json)

Every option is a way real slides differ between labs and scanners:

- stain strength and hue: hematoxylin / eosin concentration multipliers, the optical-density
  (OD) vectors of the two dyes and a hue rotation of both about the grey axis;
- scanner: lamp brightness, white balance (per-channel gains) and tone-curve gamma;
- nuclei: size and density multipliers;
- patch size, class mix (how often each tissue appears, how many tissues per patch, how often
  a patch shows glass) and texture scale (magnification of all tissue texture).

``VARIANTS`` holds the named settings; ``TUNING_VARIANTS`` / ``HELD_OUT_VARIANTS`` say which
ones the demo settings may be tuned on and which ones only measure them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mlps_dist.core.errors import InputError

H_REF = (0.650, 0.704, 0.286)  # Ruifrok & Johnston hematoxylin OD vector (R, G, B)
E_REF = (0.072, 0.990, 0.105)  # eosin


class SyntheticOptionError(InputError):
    """A synthetic-data option or variant name that cannot be used (exit status 2)."""


@dataclass(frozen=True)
class SynthOptions:
    size: int = 96  # patch side in pixels (LUAD-HistoSeg: 224)
    h_strength: float = 1.0  # x hematoxylin concentration (darker, bluer nuclei)
    e_strength: float = 1.0  # x eosin concentration (pinker cytoplasm and stroma)
    h_vector: tuple = H_REF  # hematoxylin OD per R, G, B channel (normalised)
    e_vector: tuple = E_REF  # eosin OD per R, G, B channel (normalised)
    hue_shift: float = 0.0  # degrees: both stain vectors turned about the grey axis
    brightness: float = 1.0  # x scanner lamp (glass ~232-250 at 1.0; saturates at 255)
    white_balance: tuple = (1.0, 1.0, 1.0)  # per-channel gains of the lamp (R, G, B)
    gamma: float = 1.0  # tone curve out = 255 (in/255)^(1/gamma): > 1 lifts mid-tones
    nuclear_size: float = 1.0  # x nucleus radius
    nuclear_density: float = 1.0  # x nuclei per area
    texture_scale: float = 1.0  # x size of all tissue texture (> 1 coarser, < 1 finer)
    class_weights: tuple = (0.38, 0.14, 0.20, 0.28)  # how often TE NEC LYM TAS are drawn
    tissues_per_patch: tuple = (0.35, 0.35, 0.20, 0.10)  # P(1, 2, 3, 4 tissues in a patch)
    white_prob: float = 0.4  # share of patches with white glass / lumen / fat

    def __post_init__(self):
        for name in ("h_vector", "e_vector", "white_balance", "class_weights", "tissues_per_patch"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        check_options(self)

    def as_dict(self) -> dict:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    def stain_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit OD vectors of hematoxylin and eosin after the hue rotation."""
        turn = _grey_axis_rotation(np.deg2rad(self.hue_shift))
        return tuple(_unit(turn @ _unit(np.array(v))) for v in (self.h_vector, self.e_vector))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _grey_axis_rotation(angle: float) -> np.ndarray:
    """Rodrigues rotation about (1, 1, 1)/sqrt(3): changes hue, keeps the OD magnitude."""
    k = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _fail(name: str, value, why: str):
    raise SyntheticOptionError(f"synthetic option {name}={value}: {why}")


def check_options(o: SynthOptions) -> None:
    if int(o.size) != o.size or o.size < 32:
        _fail("size", o.size, "patches must be at least 32 pixels wide (an integer)")
    for name, low, high in (
        ("h_strength", 0.05, 5),
        ("e_strength", 0.05, 5),
        ("brightness", 0.5, 1.5),
        ("gamma", 0.3, 3),
        ("nuclear_size", 0.5, 2.0),
        ("nuclear_density", 0.2, 3.0),
        ("texture_scale", 0.5, 2.0),
        ("white_prob", 0.0, 1.0),
    ):
        value = getattr(o, name)
        if not low <= value <= high:
            _fail(name, value, f"must lie in [{low}, {high}]")
    if not -90 <= o.hue_shift <= 90:
        _fail("hue_shift", o.hue_shift, "must lie in [-90, 90] degrees")
    for name in ("h_vector", "e_vector", "white_balance"):
        values = getattr(o, name)
        if len(values) != 3 or min(values) < 0 or max(values) <= 0:
            _fail(name, ",".join(map(str, values)), "needs three non-negative R,G,B values, not all zero")
    if not all(0.5 <= g <= 1.5 for g in o.white_balance):
        _fail("white_balance", ",".join(map(str, o.white_balance)), "gains must lie in [0.5, 1.5]")
    for name, length in (("class_weights", 4), ("tissues_per_patch", 4)):
        values = getattr(o, name)
        if len(values) != length or min(values) < 0 or sum(values) <= 0:
            _fail(name, ",".join(map(str, values)), f"needs {length} non-negative weights with a positive sum")
    weights = np.array(o.class_weights)
    possible = int((weights > 0).sum())
    if any(p > 0 for p in o.tissues_per_patch[possible:]):
        _fail(
            "tissues_per_patch",
            ",".join(map(str, o.tissues_per_patch)),
            f"asks for more tissues per patch than class_weights allows ({possible} with weight > 0)",
        )


# The named variants: values that differ from SynthOptions' defaults. Each one moves the data
# the way a real cohort can differ from the one a model was tuned on.
VARIANTS: dict[str, dict] = {
    "default": {},
    "pale": dict(h_strength=0.6, e_strength=0.6, brightness=1.04),  # under-stained, bleached
    "dark-hematoxylin": dict(h_strength=1.7, e_strength=0.9, hue_shift=-8.0),  # over-stained, bluer
    "scanner-bright": dict(brightness=1.12, gamma=1.25, white_balance=(1.0, 0.97, 1.04)),  # cool, washed out
    "large-nuclei": dict(nuclear_size=1.4, nuclear_density=0.8),
    "fine-texture": dict(texture_scale=0.65, nuclear_density=1.3),  # lower magnification
    "sparse-classes": dict(
        class_weights=(0.2, 0.3, 0.2, 0.3), tissues_per_patch=(0.7, 0.25, 0.05, 0.0), white_prob=0.6
    ),
    "large-patches": dict(size=224),
}

# Defined here once: the demo settings may be tuned on these; the others only measure them.
TUNING_VARIANTS = ("default", "pale", "large-nuclei", "sparse-classes")
HELD_OUT_VARIANTS = ("dark-hematoxylin", "scanner-bright", "fine-texture", "large-patches")

VARIANT_HELP = {
    "default": "reference stain and scanner, 96 px",
    "pale": "weak H and E (x0.6), slightly brighter lamp",
    "dark-hematoxylin": "strong hematoxylin (x1.7), bluer hue",
    "scanner-bright": "bright lamp (x1.12, glass saturates), gamma 1.25, cool white balance",
    "large-nuclei": "nuclei 1.4x larger, 0.8x as many",
    "fine-texture": "all texture 0.65x the size (lower magnification), 1.3x nuclear density",
    "sparse-classes": "mostly 1 tissue per patch, NEC and TAS more common, 60% of patches with glass",
    "large-patches": "224 px patches (the LUAD-HistoSeg size)",
}


def variant_options(name: str = "default", **overrides) -> SynthOptions:
    """The options of variant `name`; explicit `overrides` (not None) replace its values."""
    if name not in VARIANTS:
        raise SyntheticOptionError(f"unknown synthetic variant '{name}'; valid variants: {', '.join(VARIANTS)}")
    known = {f.name for f in dataclasses.fields(SynthOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SyntheticOptionError(f"unknown synthetic option(s) {unknown}; valid options: {', '.join(sorted(known))}")
    values = {**VARIANTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return SynthOptions(**values)


def variant_white_is_white(name: str) -> bool:
    """Whether glass stays brighter than tissue by a wide margin at grey 200 (the pipeline's
    white-background channel is then correct); weak stain pushes pale tissue above 200."""
    return name not in ("pale", "scanner-bright")
