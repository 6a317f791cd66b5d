"""Stage 3: DeepLab-v3+ trained on the multi-layer pseudo masks of stage 2.

    mlps stage segmenter CONFIG RUN   # this node: one process per GPU
    torchrun --nproc-per-node 2 -m mlps_dist -- segmenter CONFIG --run RUN
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m mlps_dist -- segmenter configs/luad.yaml --run runs/luad segmenter.parallel=deepspeed
    python -m mlps_dist segmenter configs/demo.yaml --run runs/demo segmenter.epochs=1   # one process

Reads the train shards (data.root) and RUN/pseudo_masks/train, joined by sample key; the
loss is sum_l weight_l * CE(logits, mask_l) over ``segmenter.loss_layers`` (paper: 0.6 bn7
+ 0.2 b5_2 + 0.2 b4_5), white/excluded pixels (value C) ignored; ``segmenter.loss_batch_average``
divides it once more by the global batch, as the public code's loss does. Validates on val every
``val_every_epochs`` (ungated mIoU, all-reduced) and keeps the best as RUN/segmenter/best.pt;
writes RUN/segmenter/{checkpoints/, model.pt}. Relaunching resumes from the newest
checkpoint; a finished run (model.pt exists) is left as it is. Exit status 75 means
"preempted, rerun to resume"; 2 means a problem with the config, data, masks or checkpoint.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError
from mlps_dist.core import layout
from mlps_dist.core.draw import overlay_row, palette_for
from mlps_dist.data.augment import normalise
from mlps_dist.data.decode import decode_rgb
from mlps_dist.data.loaders import create_eval_loader, create_train_loader
from mlps_dist.data.pseudo_masks import PseudoMaskStore
from mlps_dist.data.shards import open_split
from mlps_dist.method.evaluation import ConfusionEvaluator, ExampleCollector, run_eval
from mlps_dist.method.mosaic import mix_single_tissue
from mlps_dist.models import create_segmenter
from mlps_dist.predict.gate import load_classifier
from mlps_dist.predict.predictor import Predictor
from mlps_dist.run.runlog import RunLog
from mlps_dist.stages import session
from mlps_dist.train import engine
from mlps_dist.train.checkpoint import load_model_file

STAGE = "segmenter"


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, weights: list[float], ignore_index: int, white_channel: bool = False
) -> torch.Tensor:
    """sum_l weights[l] * mean pixel CE of ``logits`` (B,C,H,W) against ``masks[:, l]`` (B,L,H,W).

    Pixels equal to ``ignore_index`` count neither in the sum nor in the mean; a layer with
    no valid pixel in the batch contributes 0 (plain mean reduction would give nan).

    ``white_channel``: the public code's form instead. A constant logit channel is appended,
    100 where the first layer's mask is white (= ``ignore_index``, the value C) and 0
    elsewhere, and the CE is the mean over every pixel: white pixels cost ~0 but count in
    the mean, and elsewhere the extra logit 0 takes part in the softmax.
    """
    if white_channel:
        white = (masks[:, 0] == ignore_index).unsqueeze(1).to(torch.float32)
        extended = torch.cat([logits.float(), 100.0 * white], dim=1)
        return sum(weight * F.cross_entropy(extended, masks[:, layer]) for layer, weight in enumerate(weights))
    total = logits.new_zeros(())
    for layer, weight in enumerate(weights):
        target = masks[:, layer]
        valid = (target != ignore_index).sum().clamp(min=1)
        ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        total = total + weight * ce / valid
    return total


class SegmenterTask:
    """What stage 3 adds to the shared training loop (see engine.TrainTask)."""

    stage = STAGE

    def __init__(self, cfg: Config, train_reader, val_reader, store: PseudoMaskStore):
        self.cfg, self.section = cfg, cfg.segmenter
        self.train_reader, self.val_reader, self.store = train_reader, val_reader, store
        self.num_classes = train_reader.num_classes
        self.ignore_index = train_reader.ignore_index
        # The loader yields every layer of the store, in the store's order; pick ours.
        self.layer_slots = [store.layers.index(layer) for layer in self.section.loss_layers]
        self.meta = {
            "name": self.section.model,
            "num_classes": self.num_classes,
            "multi_grid": list(self.section.multi_grid),
            "classes": list(train_reader.classes),
            "config": cfg.to_dict(),
            # the stage-1 classifier its pseudo masks came from (classifier.checkpoint)
            "classifier": store.manifest.get("settings", {}).get("classifier", {}),
        }
        self.palette = palette_for(self.num_classes, train_reader.info)
        self.val_rows: list[np.ndarray] = []

    def build_model(self):
        if self.section.pretrained != "classifier":
            return create_segmenter(
                self.section.model, self.num_classes, self.section.pretrained, multi_grid=self.section.multi_grid
            )
        # The encoder starts as the stage-1 model the pseudo masks came from: it has learnt the
        # tissue classes of this data, where a from-scratch encoder would learn them from noisy masks.
        model = create_segmenter(self.section.model, self.num_classes, multi_grid=self.section.multi_grid)
        classifier, _ = load_classifier(self.cfg.run_dir, self.num_classes, checkpoint=self.cfg.classifier.checkpoint)
        model.backbone.load_state_dict(classifier.backbone.state_dict())
        return model

    def micro_steps_per_epoch(self, plan) -> int:
        return plan.micro_steps_per_epoch(len(self.train_reader))

    def train_loader(self, epoch: int, start_step: int, plan):
        return create_train_loader(
            self.cfg,
            self.train_reader,
            plan=plan,
            epoch=epoch,
            start_step=start_step,
            rank=dist.get_rank(),
            world=plan.world,
            device=dist.device(),
            pseudo_masks=self.store,
            augment=self.section.augment,
        )

    def loss(self, model, batch: dict) -> torch.Tensor:
        masks = batch["masks"][:, self.layer_slots].long()  # the loaders send uint8
        images, masks = mix_single_tissue(batch["image"], masks, self.ignore_index, self.section.mosaic_prob)
        loss = segmentation_loss(
            model(images),
            masks,
            self.section.loss_weights,
            self.ignore_index,
            white_channel=self.section.loss_white_channel,
        )
        if self.section.loss_batch_average:
            # The public loss (pixel mean / n, n = the whole batch on one device): the global
            # batch here, since DDP and accumulation already average the per-micro-batch means.
            loss = loss / self.section.batch_size
        return loss

    def start_epoch(self, epoch: int, module) -> dict[str, float]:
        return {"epoch": float(epoch)}

    def validate(self, module, epoch: int) -> dict[str, float]:
        """Ungated val metrics (the segmenter on its own; the gate is stage 4's business)."""
        reader, device = self.val_reader, dist.device()
        loader = create_eval_loader(
            self.cfg,
            reader,
            batch_size=self.cfg.evaluate.batch_size,
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            device=device,
        )
        predictor = Predictor(
            module,
            None,
            image_size=self.cfg.data.image_size,
            mean=self.cfg.data.mean,
            std=self.cfg.data.std,
            device=device,
        )

        def predict(batch: dict) -> dict:
            out = predictor(batch["image"], out_size=tuple(batch["mask"].shape[-2:]))
            return {"classes": out.classes(gated=False)}

        def rows(batch: dict, outputs: dict, count: int) -> list:
            return [
                overlay_row(rgb, [mask, p], self.palette)
                for rgb, mask, p in zip(batch["rgb"][:count], batch["mask"][:count], outputs["classes"][:count])
            ]

        evaluators = {
            "val": ConfusionEvaluator(self.num_classes, reader.ignore_index, device=device),
            "rows": ExampleCollector(self.section.vis_images, rows),
        }
        results = run_eval(loader, predict, evaluators)
        self.val_rows, scores = results["rows"], results["val"]
        metrics = {k: scores[k] for k in ("miou", "fwiou", "acc", "macc")}
        metrics.update({f"iou/{name}": v for name, v in zip(reader.classes, scores["iou"])})
        metrics["score"] = scores["miou"]
        return metrics

    def visualise(self, module, epoch: int, log: RunLog) -> None:
        """val: image | ground truth | prediction; train: image | each pseudo mask | prediction."""
        if not dist.is_main():
            return
        for i, row in enumerate(self.val_rows):
            log.image(f"val/{i}", row, step=epoch)
        for i in range(min(self.section.vis_images, len(self.train_reader))):
            rgb = decode_rgb(self.train_reader.read(i)["image"])
            image = torch.from_numpy(normalise(rgb.astype(np.float32), self.cfg.data.mean, self.cfg.data.std))
            pred = module(image[None].to(dist.device())).argmax(1)[0]
            log.image(f"pseudo_masks/{i}", overlay_row(rgb, [*self.store.read_masks(i), pred], self.palette), epoch)
        log.flush()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_inputs(cfg: Config, train_reader, store: PseudoMaskStore) -> None:
    """Masks for every key, layers and classes that fit; raises ConfigError saying what to do."""
    masks_dir = store.folder
    missing = store.missing(len(train_reader))
    if missing:
        keys = ", ".join(train_reader.key(i) for i in missing[:5])
        raise ConfigError(
            f"{masks_dir} has no pseudo masks for {len(missing)} of {len(train_reader)} training "
            f"samples (first: {keys}); rerun stage 2 (mlps_dist.stages.generate_masks) to complete them"
        )
    absent = [layer for layer in cfg.segmenter.loss_layers if layer not in store.layers]
    if absent:
        raise ConfigError(
            f"'segmenter.loss_layers' names {absent}, but {masks_dir} holds layers {store.layers}; "
            f"pick loss layers from those or regenerate the masks with masks.layers including them"
        )
    data_classes = list(train_reader.classes)
    sources = {f"{masks_dir}/manifest.json": store.manifest.get("settings", {}).get("classes")}
    classifier_file = layout.model_file(cfg.run_dir, "classifier")
    if classifier_file.is_file():
        sources[str(classifier_file)] = load_model_file(classifier_file)[1].get("classes")
    for source, classes in sources.items():
        if classes is not None and list(classes) != data_classes:
            raise ConfigError(
                f"{source} was made for {len(classes)} classes {list(classes)}, but "
                f"{cfg.data.root}/info.json has {len(data_classes)} {data_classes}; "
                f"use the run trained on these shards or set data.root to the matching shards"
            )
    wanted = cfg.segmenter.num_classes
    if wanted and wanted != len(data_classes):
        raise ConfigError(
            f"'segmenter.num_classes' = {wanted}, but {cfg.data.root}/info.json lists "
            f"{len(data_classes)} classes {data_classes}; fix one of them (0 = take it from the data)"
        )


def prepare(cfg: Config) -> SegmenterTask:
    """Every check that can fail before training: shards, masks, class counts, the checkpoint."""
    train_reader, val_reader = open_split(cfg.data.root, "train"), open_split(cfg.data.root, "val")
    store = PseudoMaskStore(layout.masks_dir(cfg.run_dir, "train"))
    check_inputs(cfg, train_reader, store)
    task = SegmenterTask(cfg, train_reader, val_reader, store)
    engine.check_resumable(cfg, cfg.segmenter, task)
    return task


SESSION = session.Stage(STAGE, __doc__.splitlines()[0], prepare=prepare, work=session.train)


def main(argv: list[str] | None = None) -> int:
    return session.main(SESSION, argv)


if __name__ == "__main__":
    sys.exit(main())
