"""The run directory's layout lives in one module: its paths on a run, and no other source
file joining a run file's or folder's name onto a directory."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mlps_dist.core import layout
from mlps_dist.core.errors import InputError
from mlps_dist.run import artifacts

REPO = Path(__file__).resolve().parents[2]


def test_the_paths_of_a_run(tmp_path):
    run = tmp_path / "run"
    expected = {
        layout.config_file(run): "config.yaml",
        layout.evaluated_config_file(run): "metrics/config.yaml",
        layout.model_file(run, "classifier"): "classifier/model.pt",
        layout.model_file(run, "segmenter", "best"): "segmenter/best.pt",
        layout.checkpoints_dir(run, "segmenter"): "segmenter/checkpoints",
        layout.stain_file(run): "classifier/stain.json",
        layout.health_file(run, "segmenter"): "segmenter/health.json",
        layout.health_file(run, "regression"): "regression/health.json",  # a test task's own folder
        layout.masks_dir(run): "pseudo_masks/train",
        layout.masks_manifest(run): "pseudo_masks/train/manifest.json",
        layout.reference_masks_dir(run, "b4_5"): "pseudo_masks/train_PM/PM_b4_5",
        layout.masks_report_file(run): "metrics/pseudo_masks.json",
        layout.metrics_file(run, "test"): "metrics/test.json",
        layout.stamp_file(run, "classifier"): "classifier/stamp.json",
        layout.stamp_file(run, "masks"): "pseudo_masks/stamp.json",
        layout.stamp_file(run, "evaluate", "val"): "metrics/val.stamp.json",
        layout.model_card_file(run): "MODEL_CARD.md",
        layout.log_file(run): "log.jsonl",
        layout.tensorboard_dir(run, "classifier"): "tb/classifier",
        layout.lock_file(run): ".lock",
        layout.superseded_dir(run): "superseded",
    }
    for path, rel in expected.items():
        assert path == run / rel and layout.relative(run, path) == rel and layout.resolve(str(run), rel) == path
    assert [layout.stage_dir(str(run), s).name for s in artifacts.STAGES] == [
        "classifier",
        "pseudo_masks",
        "segmenter",
        "metrics",
    ]
    with pytest.raises(ValueError):
        layout.model_file(run, "classifier", "last")


def test_what_exists_decides_the_chosen_model_and_the_stamped_files(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"config\.yaml does not exist; --run must be a run directory"):
        layout.existing_config_file(run)
    assert layout.output_files(run, "classifier") == [] and layout.output_files(run, "masks") == []
    layout.model_file(run, "classifier").parent.mkdir(parents=True)
    layout.model_file(run, "classifier").write_bytes(b"final")
    assert layout.chosen_model_file(run, "classifier", "best") == layout.model_file(run, "classifier")
    layout.model_file(run, "classifier", "best").write_bytes(b"best")
    layout.stain_file(run).write_text("{}")
    assert layout.chosen_model_file(run, "classifier", "best") == layout.model_file(run, "classifier", "best")
    assert layout.chosen_model_file(run, "classifier", "last") == layout.model_file(run, "classifier")
    assert [p.name for p in layout.output_files(run, "classifier")] == ["model.pt", "best.pt", "stain.json"]
    layout.masks_dir(run).mkdir(parents=True)
    for name in ("masks-000000.tar", "masks-000000.idx", "manifest.json", "notes.txt"):
        (layout.masks_dir(run) / name).write_text("")
    assert [p.name for p in layout.output_files(run, "masks")] == [
        "manifest.json",
        "masks-000000.idx",
        "masks-000000.tar",
    ]
    assert layout.output_files(run, "evaluate", "val") == [layout.metrics_file(run, "val")]
    layout.config_file(run).write_text("run_dir: x\n")
    assert layout.existing_config_file(str(run)) == run / "config.yaml"
    assert {layout.relative(run, p) for p in layout.prediction_files(run)} == {
        "config.yaml",
        "metrics/config.yaml",
        "segmenter/best.pt",
        "segmenter/model.pt",
        "classifier/best.pt",
        "classifier/model.pt",
        "classifier/stain.json",
    }


# ---------------------------------------------------------------- no second owner of the layout

# Names of the run directory's folders: joined onto a directory (``x / "segmenter"``,
# ``os.path.join(x, "metrics")``) only by layout.py. As bare strings they are stage names
# and log keys, so only a join counts.
FOLDER_NAMES = {"classifier", "segmenter", "pseudo_masks", "metrics", "checkpoints", "train_PM", "tb", "superseded"}
# Names of the run directory's files: in a join, or as any string naming a run-relative path
# ("segmenter/model.pt", f"{run}/config.yaml").
FILE_NAMES = {
    "model.pt",
    "best.pt",
    "config.yaml",
    "stamp.json",
    "stain.json",
    "health.json",
    "MODEL_CARD.md",
    "log.jsonl",
    "pseudo_masks.json",
}
# The lock's name: in a join only (output folders of the tools have locks of their own).
JOINED_NAMES = FOLDER_NAMES | FILE_NAMES | {".lock"}
RUN_RELATIVE = re.compile(
    r"(^|/)(classifier|segmenter|pseudo_masks|metrics)/\S*\.(pt|json|yaml)$|"
    r"(^|/)(" + "|".join(re.escape(n) for n in FILE_NAMES) + r")$"
)
OWNERS = {"mlps_dist/core/layout.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _text(node: ast.AST) -> str | None:
    """The literal text of a string or f-string (its formatted parts as ``{}``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


# A run directory as the sources name it: nothing but layout.py joins anything onto one.
RUN_DIR = re.compile(r"^(Path\()?((cfg|args|self)\.)?(run|run_dir)\)?$")


def _called(node: ast.Call) -> str:
    return getattr(node.func, "attr", getattr(node.func, "id", ""))


def layout_violations(path: Path, source: str) -> list[str]:
    tree = ast.parse(source, str(path))
    docstrings = _docstrings(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        if not any(f.split(":")[1] == str(node.lineno) for f in found):  # one finding a line
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {what}")

    for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            name = _text(node.right)
            if name is not None and (name in JOINED_NAMES or RUN_RELATIVE.search(name)):
                flag(node, f'joins "{name}" onto a directory: use mlps_dist.core.layout')
            elif RUN_DIR.match(ast.unparse(node.left)):
                flag(node, f"joins {ast.unparse(node.right)} onto the run directory: use mlps_dist.core.layout")
        elif isinstance(node, ast.Call) and _called(node) in ("join", "Path", "PurePath", "joinpath"):
            for arg in node.args[0 if _called(node) == "joinpath" else 1 :]:
                name = _text(arg)
                if name in JOINED_NAMES:
                    flag(node, f'joins "{name}" onto a directory: use mlps_dist.core.layout')
        elif isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in docstrings:
            text = _text(node)
            if text is not None and "\n" not in text and " " not in text and RUN_RELATIVE.search(text):
                flag(node, f'names the run file "{text}": use mlps_dist.core.layout')
    return found


def sources() -> list[Path]:
    files = sorted((REPO / "mlps_dist").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    return [p for p in files if str(p.relative_to(REPO)) not in OWNERS]


def test_only_the_layout_module_joins_run_directory_names():
    found = []
    for path in sources():
        found += layout_violations(path, path.read_text())
    assert not found, "run-directory paths outside mlps_dist/core/layout.py:\n" + "\n".join(found)


def test_the_check_finds_each_way_of_spelling_a_run_path():
    bad = '''
"""A docstring may say RUN/segmenter/model.pt and run / "config.yaml"."""
a = run / "segmenter" / "model.pt"          # a comment may too: run / "metrics"
b = Path(run_dir) / "config.yaml"
c = os.path.join(run, "metrics")
d = f"{run}/config.yaml"
e = "classifier/best.pt"
f = Path(run, "segmenter")
g = run.joinpath("metrics", name)
h = Path(cfg.run_dir) / folder / name
ok = {"classifier": 1, "stage": "metrics", "keys": [f"pseudo_masks/{split}/"], "tag": "val/score"}
ok2 = shard_dir / "train" / "info.json"
'''
    found = layout_violations(REPO / "x.py", bad)
    assert [line.split(":")[1] for line in found] == ["3", "4", "5", "6", "7", "8", "9", "10"], found
