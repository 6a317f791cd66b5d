"""Where every file of a run directory lives: the one module that joins names onto RUN.

    RUN/config.yaml                 the resolved config: written when a training stage starts
                                    and again by the evaluation (what its metrics measured)
    RUN/log.jsonl, RUN/tb/<stage>/  the run log (mlps_dist.run.runlog)
    RUN/.lock                       the job working in RUN (mlps_dist.run.lock)
    RUN/MODEL_CARD.md               the model card (mlps_dist.run.model_card)
    RUN/classifier/                 checkpoints/, best.pt, model.pt, stain.json, stamp.json   (stage 1)
    RUN/pseudo_masks/train/         masks-NNNNNN.{tar,idx}, manifest.json                     (stage 2)
    RUN/pseudo_masks/train_PM/      PM_<layer>/*.png, the public code's layout (masks.export_reference)
    RUN/pseudo_masks/stamp.json
    RUN/segmenter/                  checkpoints/, best.pt, model.pt, stamp.json               (stage 3)
    RUN/metrics/                    <split>.json, <split>.stamp.json, config.yaml             (stage 4)
                                    and pseudo_masks.json, stage 2's quality report of its masks
    RUN/superseded/<time>/          artefacts moved aside by a restart, in this same layout

Every function takes the run directory (a str or Path) and returns a Path; none creates or
reads anything, so any folder laid out like a run (a superseded copy, another run to compare
with) is addressed the same way. Torch-free, so that deploy and slides can use it.
"""

from __future__ import annotations

from pathlib import Path

from mlps_dist.core.errors import InputError
from mlps_dist.core.lock import LOCK_NAME

# The folder of each stage's artefacts, by stage name.
FOLDERS = {"classifier": "classifier", "masks": "pseudo_masks", "segmenter": "segmenter", "evaluate": "metrics"}
# The stages whose artefact is a trained network (model.pt, best.pt, checkpoints/).
TRAINED = ("classifier", "segmenter")
# The model card's file name, in a run and in an exported model's folder.
MODEL_CARD_NAME = "MODEL_CARD.md"
_CONFIG_NAME = "config.yaml"
_MASKS_REPORT = "pseudo_masks.json"


def stage_dir(run: str | Path, stage: str) -> Path:
    """The stage's folder; a training task of another name (the engine's tests) gets a
    folder of that name."""
    return Path(run) / FOLDERS.get(stage, stage)


# ---------------------------------------------------------------- trained networks (stages 1 and 3)


def model_file(run: str | Path, stage: str, which: str = "model") -> Path:
    """RUN/<stage>/model.pt (the final weights) or best.pt (``which="best"``)."""
    if which not in ("model", "best"):
        raise ValueError(f"which must be 'model' or 'best', got {which!r}")
    return stage_dir(run, stage) / f"{which}.pt"


def chosen_model_file(run: str | Path, stage: str, checkpoint: str) -> Path:
    """The file a ``checkpoint`` choice ("best" or "last") selects: best.pt for "best" when it
    exists (no validated epoch writes none), model.pt otherwise."""
    best = model_file(run, stage, "best")
    return best if checkpoint == "best" and best.is_file() else model_file(run, stage)


def checkpoints_dir(run: str | Path, stage: str) -> Path:
    return stage_dir(run, stage) / "checkpoints"


def health_file(run: str | Path, stage: str) -> Path:
    """RUN/<stage>/health.json: the training guard's decisions (mlps_dist.train.guard)."""
    return stage_dir(run, stage) / "health.json"


def stain_file(run: str | Path) -> Path:
    """RUN/classifier/stain.json: the stain reference stage 1 fitted (data.stain)."""
    return stage_dir(run, "classifier") / "stain.json"


# ---------------------------------------------------------------- pseudo masks (stage 2)


def masks_dir(run: str | Path, split: str = "train") -> Path:
    return stage_dir(run, "masks") / split


def masks_manifest(run: str | Path, split: str = "train") -> Path:
    """The pseudo-mask store's manifest (its name is the store's: mlps_dist.data.pseudo_masks)."""
    return masks_dir(run, split) / "manifest.json"


def reference_masks_dir(run: str | Path, layer: str) -> Path:
    """RUN/pseudo_masks/train_PM/PM_<layer>: one layer's masks as the public code lays them out."""
    return stage_dir(run, "masks") / "train_PM" / f"PM_{layer}"


def masks_report_file(run: str | Path) -> Path:
    """Stage 2's quality report of its masks. It lives in metrics/ beside the evaluation's
    files but belongs to the masks (a restart after the masks keeps it)."""
    return stage_dir(run, "evaluate") / _MASKS_REPORT


# ---------------------------------------------------------------- evaluation (stage 4)


def metrics_file(run: str | Path, split: str) -> Path:
    return stage_dir(run, "evaluate") / f"{split}.json"


def evaluated_config_file(run: str | Path) -> Path:
    """RUN/metrics/config.yaml: the resolved config the evaluation measured with, for the record."""
    return stage_dir(run, "evaluate") / _CONFIG_NAME


# ---------------------------------------------------------------- provenance


def stamp_file(run: str | Path, stage: str, split: str = "") -> Path:
    if stage == "evaluate":
        return stage_dir(run, stage) / f"{split}.stamp.json"
    return stage_dir(run, stage) / "stamp.json"


def output_files(run: str | Path, stage: str, split: str = "") -> list[Path]:
    """The files a finished stage stands for (hashed into its stamp), those that exist."""
    if stage in TRAINED:
        files = [model_file(run, stage), model_file(run, stage, "best")]
        if stage == "classifier":
            files.append(stain_file(run))
        return [p for p in files if p.is_file()]
    if stage == "masks":
        folder = masks_dir(run)
        return sorted(p for p in folder.iterdir() if p.suffix in (".tar", ".idx", ".json")) if folder.is_dir() else []
    return [metrics_file(run, split)]


def prediction_files(run: str | Path) -> list[Path]:
    """Every file that can change what a finished run predicts: its resolved configs, the
    model files of both networks and the stain reference (existing or not)."""
    return [
        config_file(run),
        evaluated_config_file(run),
        *(model_file(run, stage, which) for stage in ("segmenter", "classifier") for which in ("best", "model")),
        stain_file(run),
    ]


# ---------------------------------------------------------------- the run as a whole


def config_file(run: str | Path) -> Path:
    """RUN/config.yaml: what every consumer of a finished run (infer, export, the slide tools,
    figures, the model card) reads. The training stages write it when they start; the
    evaluation writes it again at its end, so after a re-evaluation with other evaluate.*
    settings it holds those settings, the ones the metrics measured."""
    return Path(run) / _CONFIG_NAME


def existing_config_file(run: str | Path) -> Path:
    """config_file, or InputError (exit 2) naming it when ``run`` is not a trained run."""
    path = config_file(run)
    if not path.is_file():
        raise InputError(f"{path} does not exist; --run must be a run directory of a finished training")
    return path


def model_card_file(run: str | Path) -> Path:
    return Path(run) / MODEL_CARD_NAME


def log_file(run: str | Path) -> Path:
    return Path(run) / "log.jsonl"


def tensorboard_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / "tb" / stage


def lock_file(run: str | Path) -> Path:
    return Path(run) / LOCK_NAME


def superseded_dir(run: str | Path) -> Path:
    """Where a restart moves artefacts (one subfolder per restart, laid out like a run)."""
    return Path(run) / "superseded"


def resolve(run: str | Path, recorded: str | Path) -> Path:
    """A path recorded relative to the run directory (``relative``) as a path again."""
    return Path(run) / recorded


def relative(run: str | Path, path: str | Path) -> str:
    """``path`` as recorded in metrics, manifests and model records: relative to the run
    directory, with forward slashes ("classifier/best.pt")."""
    return Path(path).relative_to(Path(run)).as_posix()
