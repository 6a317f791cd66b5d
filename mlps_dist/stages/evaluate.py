"""Stage 4: segmentation metrics of the trained segmenter on val/test, with and without the gate.

    mlps stage evaluate CONFIG RUN   # this node: one process per GPU
    torchrun --nproc-per-node 2 -m mlps_dist -- evaluate CONFIG --run RUN
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m mlps_dist -- evaluate configs/luad.yaml --run runs/luad evaluate.splits=[val,test] evaluate.checkpoint=best
    python -m mlps_dist evaluate configs/demo.yaml --run runs/demo   # one process

For each split of ``evaluate.splits`` every sample is evaluated exactly once across ranks;
the segmenter's logits are upsampled to the mask size; one confusion matrix per variant
(gated, ungated) is summed over ranks. Rank 0 writes RUN/metrics/<split>.json:

    {"miou", "fwiou", "acc", "macc", "iou": {class: IoU}       # gated (the reported result)
     "ungated": {same keys},  "split", "samples", "segmenter", "gate_threshold", "gate"}

With ``evaluate.gate=false`` the top-level keys are the ungated result too. IoU of a class
absent from both prediction and ground truth is null (nan) and left out of the mIoU.
A split whose stamp (RUN/metrics/<split>.stamp.json, mlps_dist.run.artifacts) matches the
current segmenter, gate classifier, shards and evaluate settings is not evaluated again;
when any of them changed it is evaluated again. At the end rank 0 writes the resolved
config into RUN/config.yaml (and RUN/metrics/config.yaml): what inference, export, the
slide tools and the model card predict with is what the metrics measured.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError, save_config
from mlps_dist.core import layout
from mlps_dist.core.fileio import atomic_write_json
from mlps_dist.data.loaders import create_eval_loader
from mlps_dist.data.shards import open_split
from mlps_dist.method.evaluation import ConfusionEvaluator, SkippedCounter, run_eval
from mlps_dist.predict.predictor import Predictor, create_predictor, file_digest
from mlps_dist.run import artifacts
from mlps_dist.run.runlog import RunLog, format_table
from mlps_dist.stages import session
from mlps_dist.train.checkpoint import load_model_file


@torch.no_grad()
def evaluate_split(cfg: Config, split: str, reader, predictor: Predictor, device, log: RunLog) -> dict:
    """Scores of one split over all ranks (ConfusionMatrix.compute records): "ungated", and
    "gated" when the predictor has the gate; "skipped": how many samples were left out
    because they cannot be decoded (only ever non-zero with ``evaluate.skip_bad``)."""
    loader = create_eval_loader(
        cfg,
        reader,
        batch_size=cfg.evaluate.batch_size,
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        device=device,
        skip_bad=cfg.evaluate.skip_bad,
    )

    def predict(batch: dict) -> dict:
        out = predictor(batch["image"], out_size=tuple(batch["mask"].shape[-2:]))
        outputs = {"ungated": out.classes(gated=False)}
        if predictor.gated:
            outputs["gated"] = out.classes(gated=True)
        return outputs

    evaluators = {
        variant: ConfusionEvaluator(reader.num_classes, reader.ignore_index, key=variant, device=device)
        for variant in (("ungated", "gated") if predictor.gated else ("ungated",))
    }
    evaluators["skipped"] = SkippedCounter()
    return run_eval(log.progress(loader, total=len(loader), desc=split), predict, evaluators)


def _named(scores: dict, classes: list[str]) -> dict:
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scores.items() if k != "iou"}
    out["iou"] = {name: (None if math.isnan(v) else v) for name, v in zip(classes, scores["iou"])}
    return out


def metrics_record(scores: dict[str, dict], classes: list[str], gate: bool) -> dict:
    ungated = _named(scores["ungated"], classes)
    main = _named(scores["gated"], classes) if gate else dict(ungated)
    return {**main, "ungated": ungated}


def summary_table(record: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    gated, ungated = record, record["ungated"]
    rows = [(f"IoU {name}", pct(gated["iou"][name]), pct(ungated["iou"][name])) for name in gated["iou"]]
    rows += [(key, pct(gated[key]), pct(ungated[key])) for key in ("miou", "fwiou", "acc", "macc")]
    return format_table(rows, header=("metric (%)", "gated" if record.get("gate") else "result", "ungated"))


def open_splits(cfg: Config) -> dict:
    """All readers first, so that a split without masks fails before any work."""
    readers = {split: open_split(cfg.data.root, split) for split in cfg.evaluate.splits}
    for split, reader in readers.items():
        if not reader.has_masks:
            raise ValueError(
                f"{cfg.data.root}: split '{split}' has no ground-truth masks; "
                f"set evaluate.splits to splits that have them (val, test)"
            )
    return readers


def check_classes(path: str, meta: dict, reader) -> None:
    """Same class names in the same order (not only the same count: 4 LUAD classes are not
    4 BCSS classes)."""
    classes = meta.get("classes")
    if classes is not None and list(classes) != list(reader.classes):
        raise ConfigError(
            f"{path} was trained on classes {list(classes)}, but split '{reader.split}' of "
            f"{reader.root} has {list(reader.classes)}; evaluate it on the shards it was trained "
            f"on (data.root), or use the run trained on these"
        )


@dataclass
class Prepared:
    """The splits and the models, checked against each other before any sample is read."""

    readers: dict  # split -> SplitReader
    predictor: Predictor
    seg_meta: dict  # the segmenter's meta (path, classes, the gate's classifier record)
    device: torch.device


def prepare(cfg: Config) -> Prepared:
    device = dist.device()
    readers = open_splits(cfg)
    num_classes = next(iter(readers.values())).num_classes
    predictor, seg_meta = create_predictor(
        cfg.run_dir, cfg, checkpoint=cfg.evaluate.checkpoint, num_classes=num_classes, device=device
    )
    gate_meta = load_model_file(layout.model_file(cfg.run_dir, "classifier"))[1] if predictor.gated else None
    for reader in readers.values():
        check_classes(seg_meta["path"], seg_meta, reader)
        if gate_meta is not None:
            check_classes(str(layout.model_file(cfg.run_dir, "classifier")), gate_meta, reader)
    return Prepared(readers, predictor, seg_meta, device)


def run(cfg: Config, log: RunLog) -> dict[str, dict]:
    """Every split of evaluate.splits not yet evaluated for this segmenter, gate and shards."""
    return work(cfg, log, prepare(cfg))


def work(cfg: Config, log: RunLog, p: Prepared) -> dict[str, dict]:
    """The metrics of each split (read back where its stamp matches), then the config they
    were measured with."""
    readers, predictor, seg_meta, device = p.readers, p.predictor, p.seg_meta, p.device
    results = {}
    for split, reader in readers.items():
        source = {
            "split": split,
            "segmenter": seg_meta["path"],
            "segmenter_digest": file_digest(seg_meta["path"]),
            "gate": cfg.evaluate.gate,
            "gate_threshold": cfg.evaluate.gate_threshold,
            "classifier": seg_meta["classifier"],
        }  # the gate's stage-1 model (classifier.checkpoint)
        out = layout.metrics_file(cfg.run_dir, split)
        if artifacts.status(cfg, "evaluate", split).state == "done":
            log.info(f"{out} is up to date for this segmenter, gate and shards")
            results[split] = json.loads(out.read_text())
            continue
        inputs = artifacts.expected_inputs(cfg, "evaluate", split)
        scores = evaluate_split(cfg, split, reader, predictor, device, log)
        skipped = scores.pop("skipped")
        record = {**metrics_record(scores, reader.classes, cfg.evaluate.gate), **source, "samples": len(reader)}
        if cfg.evaluate.skip_bad:
            record["skipped_bad"] = skipped  # left out: they cannot be decoded (named in the log)
            if skipped:
                log.info(f"{split}: {skipped} sample(s) that cannot be decoded were left out (evaluate.skip_bad)")
        if dist.is_main():
            atomic_write_json(out, record)
            artifacts.write_stamp(cfg, "evaluate", inputs, split)
        log.info(f"{split} ({len(reader)} samples)\n{summary_table(record)}")
        log.event("metrics", **record)
        results[split] = record
    if dist.is_main():
        save_evaluated_config(cfg)
    dist.barrier()
    return results


def save_evaluated_config(cfg: Config) -> None:
    """The settings the metrics were measured with, where every consumer of the run reads
    them (infer --run, export, segment_slides, the model card, mlps visualize read
    RUN/config.yaml): an evaluation with changed evaluate.* settings replaces the settings
    the training stages left there. RUN/metrics/config.yaml keeps the same for the record."""
    save_config(cfg, layout.evaluated_config_file(cfg.run_dir))
    save_config(cfg, layout.config_file(cfg.run_dir))


# Stamped per split as each finishes (a stale split is simply evaluated again).
SESSION = session.Stage(
    "evaluate",
    __doc__.splitlines()[0],
    prepare=prepare,
    work=work,
    skip_bad_key="evaluate.skip_bad",
    tensorboard=False,
    stamped=False,
)


def main(argv: list[str] | None = None) -> int:
    return session.main(SESSION, argv)


if __name__ == "__main__":
    sys.exit(main())
