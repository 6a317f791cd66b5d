"""The package's layers: the torch-free wing imports without torch, and no module imports a
layer above its own (docs/architecture.md has the picture)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mlps_dist"

# Bottom to top: a module may import its own layer and the layers before it.
LAYERS = [
    "core",
    "dist",
    "config",
    "models",
    "method",
    "data",
    "run",
    "slides",
    "synthetic",
    "train",
    "deploy",
    "predict",
    "stages",
    "cli",
    "__main__",
]
# Imports inside a function that reach upwards, each for a reason.
LAZY_UPWARD = {
    # infer and segment_slides run an exported model without torch; a run's own torch model
    # is opened only when --run is given
    ("deploy", "predict"),
    # load_config resolves data.image_size (when it is 0: the stored patch side) from the
    # shards' info.json
    ("config", "data"),
}
TORCH_FREE = ["core", "slides", "deploy"]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(line, imported module, at module level?) of every mlps_dist import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlps_dist"):
            if node.module == "mlps_dist":
                for alias in node.names:
                    yield node.lineno, f"mlps_dist.{alias.name}", id(node) in top
            else:
                yield node.lineno, node.module, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlps_dist."):
                    yield node.lineno, alias.name, id(node) in top


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(_module_name(path))
        if own == "__init__":
            continue
        for line, module, at_top in _imports(path):
            other = _layer(module)
            if other in ("__init__", "__version__") or other == own:
                continue
            if LAYERS.index(other) > LAYERS.index(own) and (at_top or (own, other) not in LAZY_UPWARD):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({other})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_every_package_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert folders | modules <= set(LAYERS), sorted((folders | modules) - set(LAYERS))


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_the_torch_free_layers_import_without_torch(layer):
    """Every module of ``layer`` imports in an interpreter where ``import torch`` fails."""
    modules = sorted(_module_name(p) for p in (PACKAGE / layer).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
