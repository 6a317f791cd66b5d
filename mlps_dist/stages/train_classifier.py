"""Stage 1: the multi-label patch classifier (ResNet-38d + Progressive Dropout Attention).

    mlps stage classifier CONFIG RUN   # this node: one process per GPU
    torchrun --nproc-per-node 2 -m mlps_dist -- classifier CONFIG --run RUN
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m mlps_dist -- classifier configs/luad.yaml --run runs/luad classifier.parallel=deepspeed
    python -m mlps_dist classifier configs/demo.yaml --run runs/demo classifier.epochs=1   # one process

Writes RUN/classifier/{checkpoints/, best.pt, model.pt} (and stain.json with data.stain on).
Relaunching the same command resumes
from the newest checkpoint; a finished run (model.pt exists) is left as it is. Exit status 75
means "preempted, rerun to resume"; 2 means a problem with the config, data or checkpoint.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError, PdaConfig
from mlps_dist.data.augment import model_input
from mlps_dist.data.loaders import create_eval_loader, create_train_loader
from mlps_dist.data.shards import open_split
from mlps_dist.data.stain_run import write_reference
from mlps_dist.method.evaluation import CamEvaluator, ExampleCollector, MultiLabelEvaluator, run_eval
from mlps_dist.models import create_classifier
from mlps_dist.run.runlog import RunLog
from mlps_dist.stages import session
from mlps_dist.train import engine

STAGE = "classifier"


def scheduled_gamma(pda: PdaConfig, epoch: int) -> float:
    """The public schedule: gamma starts at gamma_init and, at the end of every epoch from
    epoch 0 on, is multiplied by gamma_decay while it is still above gamma_min (so it ends
    just below the floor: 1.0 x 0.98^22 = 0.641 with the paper's values)."""
    gamma = pda.gamma_init
    for _ in range(epoch):
        if gamma > pda.gamma_min:
            gamma *= pda.gamma_decay
    return gamma


def pda_gamma(pda: PdaConfig, epoch: int) -> float | None:
    """The gamma PDA applies in ``epoch``: None (PDA off) before ``start_epoch``, then the
    schedule's value (public recipe: 0.98^3 = 0.941 at epoch 3, the first PDA epoch)."""
    if epoch < pda.start_epoch:
        return None
    return scheduled_gamma(pda, epoch)


def class_activation_maps(module, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CAM_c = relu(w_c . bn7) from the head weights, upsampled to the patch ``size``:
    (B,C,H,W). A plain CAM for monitoring; stage 2 computes the multi-layer Grad-CAM."""
    bn7 = module.forward_features(images)["bn7"]
    cams = F.relu(F.conv2d(bn7, module.head.weight))
    return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)


def cam_overlay_row(rgb: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """The patch followed by one red-to-blue CAM overlay per class, side by side (H, W*(C+1), 3)."""
    panels = [rgb]
    for cam in cams:
        heat = cam / max(float(cam.max()), 1e-6)
        colour = np.stack([heat, np.zeros_like(heat), 1.0 - heat], axis=-1) * 255.0
        panels.append((0.5 * rgb + 0.5 * colour).astype(np.uint8))
    return np.concatenate(panels, axis=1)


class ClassifierTask:
    """What stage 1 adds to the shared training loop (see engine.TrainTask)."""

    stage = STAGE

    def __init__(self, cfg: Config, train_reader, val_reader):
        self.cfg, self.section = cfg, cfg.classifier
        self.train_reader, self.val_reader = train_reader, val_reader
        self.num_classes = train_reader.num_classes
        self.meta = {
            "name": self.section.model,
            "num_classes": self.num_classes,
            "classes": list(train_reader.classes),
            "config": cfg.to_dict(),
        }
        self.gamma: float | None = None
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []  # val patches + CAMs to draw

    def build_model(self):
        return create_classifier(
            self.section.model,
            self.num_classes,
            self.section.pretrained,
            freeze_stages=self.section.freeze_stages,
            freeze_bn=self.section.freeze_bn,
            dropout=self.section.dropout,
            pda_attention=self.section.pda.attention,
        )

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
            augment=self.section.augment,
        )

    def loss(self, model, batch: dict) -> torch.Tensor:
        # fp32 loss from the (bf16/fp16 under autocast) logits: logsigmoid is not on autocast's fp32 list
        return F.multilabel_soft_margin_loss(model(batch["image"]).float(), batch["labels"])

    def start_epoch(self, epoch: int, module) -> dict[str, float]:
        self.gamma = module.pda_gamma = pda_gamma(self.section.pda, epoch)
        return {"pda_gamma": self.gamma if self.gamma is not None else 0.0}

    def validate(self, module, epoch: int) -> dict[str, float]:
        """Multi-label acc/F1 and the mIoU of label-gated CAM argmax masks against val masks."""
        reader, device = self.val_reader, dist.device()
        loader = create_eval_loader(
            self.cfg,
            reader,
            batch_size=max(self.section.batch_size // dist.get_world_size(), 1),
            rank=dist.get_rank(),
            world=dist.get_world_size(),
            device=device,
        )

        def predict(batch: dict) -> dict:
            images = model_input(batch["image"], self.cfg.data.image_size)
            outputs = {"probs": torch.sigmoid(module(images))}
            outputs["cams"] = cams = class_activation_maps(module, images, batch["rgb"].shape[-2:])
            if reader.has_masks:
                gated = cams.masked_fill(batch["labels"][:, :, None, None] < 0.5, -1.0)  # absent classes never win
                outputs["masks"] = {"cam": gated.argmax(dim=1)}
            return outputs

        def panels(batch: dict, outputs: dict, count: int) -> list:
            return [
                (rgb.permute(1, 2, 0).cpu().numpy(), cam.float().cpu().numpy())
                for rgb, cam in zip(batch["rgb"][:count], outputs["cams"][:count])
            ]

        evaluators = {
            "labels": MultiLabelEvaluator(self.num_classes, device=device),
            "samples": ExampleCollector(self.section.cam_images, panels),
        }
        if reader.has_masks:
            evaluators["cam"] = CamEvaluator(self.num_classes, reader.ignore_index, ["cam"], device=device)
        results = run_eval(loader, predict, evaluators)
        self.samples = results["samples"]
        metrics = {"acc": results["labels"]["acc"], "f1": results["labels"]["f1"]}
        if reader.has_masks:
            metrics["miou"] = results["cam"]["cam"]["miou"]
        metrics["score"] = metrics.get("miou", metrics["f1"])  # CAM quality is what stage 2 consumes
        return metrics

    def visualise(self, module, epoch: int, log: RunLog) -> None:
        """CAM panels after each epoch, under cam/pda_off/<i> before the PDA onset and
        cam/pda_on/<i> from it on, so the shift of attention shows side by side."""
        state = "pda_on" if self.gamma is not None else "pda_off"
        pda = self.section.pda
        caption = (
            f"epoch {epoch}: PDA on, gamma {self.gamma:.3f}, attention {pda.attention}"
            if self.gamma is not None
            else f"epoch {epoch}: PDA off (starts at epoch {pda.start_epoch})"
        )
        for i, (rgb, cams) in enumerate(self.samples):
            log.image(f"cam/{state}/{i}", cam_overlay_row(rgb, cams), step=epoch)
        if self.samples:
            log.text("cam/pda_state", caption, step=epoch)
        log.flush()

    def failure_hint(self, epoch: int) -> str:
        """The config keys named when training fails for good (see mlps_dist/train/guard.py)."""
        pda = self.section.pda
        if epoch >= pda.start_epoch:
            extra = "" if pda.attention == "normalised" else " (or 'classifier.pda.attention=normalised')"
            return f"'classifier.lr' or 'classifier.pda.start_epoch'{extra}"
        return "'classifier.lr'"

    def state_dict(self) -> dict:
        return {"pda_gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = state.get("pda_gamma")


def prepare(cfg: Config) -> ClassifierTask:
    """Every check that can fail before training: shards, class count, the checkpoint to resume."""
    train_reader, val_reader = open_split(cfg.data.root, "train"), open_split(cfg.data.root, "val")
    wanted = cfg.classifier.num_classes
    if wanted and wanted != train_reader.num_classes:
        raise ConfigError(
            f"'classifier.num_classes' = {wanted}, but {cfg.data.root}/info.json lists "
            f"{train_reader.num_classes} classes {train_reader.classes}; fix one of them"
        )
    write_reference(cfg)  # data.stain: fitted on the training patches before any loader reads them
    task = ClassifierTask(cfg, train_reader, val_reader)
    engine.preflight(cfg, cfg.classifier, task)  # fail now, not after building the model
    return task


SESSION = session.Stage(STAGE, __doc__.splitlines()[0], prepare=prepare, work=session.train)


def main(argv: list[str] | None = None) -> int:
    return session.main(SESSION, argv)


if __name__ == "__main__":
    sys.exit(main())
