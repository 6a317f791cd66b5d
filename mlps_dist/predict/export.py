"""Export a trained run to ONNX: one graph with normalisation, segmenter, classifier and gate.

    mlps export --run runs/luad --out export/luad [--opset 17] [--checkpoint best|last]

Writes into the ``--out`` folder:

    model.onnx      input ``image`` uint8 RGB (N, 3, H, W), N/H/W dynamic, at the training MPP;
                    outputs ``classes`` (N, H, W) int64, ``scores`` (N, C, H, W) float32 softmax
                    after the gate, ``presence`` (N, C) float32 gate probabilities
                    (mlps_dist.predict.export_graph describes the graph)
    model.json      classes, palette, ignore index, training MPP and patch size, model input
                    size, gate and threshold, normalisation, the run's metrics, digests of the
                    weights and of model.onnx, the self-check's figures, versions
    MODEL_CARD.md   the run's model card (RUN/MODEL_CARD.md, rendered now when the run has none)

The export checks itself before model.onnx appears: onnxruntime against the torch model on
the run's test patches (``--check-split``); the class maps must agree on at least 99.9 % of
pixels. The agreement and the largest score difference are printed; below the bar the
command fails (exit status 1) and writes no model.onnx. The graph is produced by torch's
TorchScript-based exporter (``dynamo=False``): it keeps N, H and W dynamic through the
resize and the upsampling and needs no onnxscript.
"""

from __future__ import annotations

import datetime
import io
import json
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlps_dist.core import layout
from mlps_dist.core.errors import InputError, MlpsError
from mlps_dist.core.fileio import atomic_write_bytes, atomic_write_json, commit_file, sha256_file, tmp_path
from mlps_dist.predict.export_graph import INPUT_NAME, OUTPUT_NAMES, DeployGraph

MIN_AGREEMENT = 0.999
FORMAT_VERSION = 1


class ExportCheckError(MlpsError):
    """The exported graph does not reproduce the torch model."""

    exit_code = 1


def export_graph(graph: DeployGraph, path: Path, opset: int) -> None:
    """torch -> ONNX at ``path`` with dynamic N, H, W."""
    example = torch.zeros(1, 3, graph.image_size or 32, graph.image_size or 32, dtype=torch.uint8)
    dynamic = {
        "image": {0: "N", 2: "H", 3: "W"},
        "classes": {0: "N", 1: "H", 2: "W"},
        "scores": {0: "N", 2: "H", 3: "W"},
        "presence": {0: "N"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notes about this exporter path
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(path))


def check_patches(reader, limit: int = 0):
    """Batches of uint8 (N, 3, H, W) test patches, consecutive samples of equal size."""
    count = len(reader) if not limit else min(limit, len(reader))
    batch: list[np.ndarray] = []
    for i in range(count):
        with Image.open(io.BytesIO(reader.read(i)["image"])) as img:
            rgb = np.array(img.convert("RGB")).transpose(2, 0, 1)
        if batch and (rgb.shape != batch[0].shape or len(batch) == 16):
            yield np.stack(batch)
            batch = []
        batch.append(rgb)
    if batch:
        yield np.stack(batch)


def self_check(predictor, onnx_path: Path, batches, total: int | None = None) -> dict:
    """onnxruntime vs torch on the same uint8 patches: class agreement, largest score difference.
    Patches compared / ``total`` go to stderr (mlps_dist/core/progress.py)."""
    import onnxruntime as ort

    from mlps_dist.core.progress import Progress
    from mlps_dist.method.evaluation import AgreementEvaluator, run_eval

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    progress = Progress("self-check", total, "patches")

    def predict(tiles: np.ndarray) -> dict:
        if predictor.stain is not None:  # applied before the graph, as deploy.OnnxModel does
            tiles = predictor.stain.tiles(tiles)
        classes, scores = session.run(["classes", "scores"], {INPUT_NAME: tiles})
        out = predictor(torch.from_numpy(tiles), stain=False)
        progress.update(len(tiles))
        return {"onnx": (classes, scores), "torch": (out.classes().cpu().numpy(), out.scores().cpu().numpy())}

    check = run_eval(batches, predict, {"agreement": AgreementEvaluator("onnx", "torch")})["agreement"]
    progress.close()
    if not check["pixels"]:
        raise ExportCheckError("self-check: no patches to compare; choose a --check-split with samples")
    return check


def read_metrics(run: Path) -> dict:
    metrics = {}
    for split in ("val", "test"):
        path = layout.metrics_file(run, split)
        if path.is_file():
            record = json.loads(path.read_text())
            keys = ("miou", "fwiou", "acc", "macc", "iou", "samples", "gate", "gate_threshold")
            metrics[split] = {k: record.get(k) for k in keys}
            metrics[split]["ungated"] = {k: record.get("ungated", {}).get(k) for k in ("miou", "fwiou", "iou")}
    return metrics


def versions(*names: str) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def model_record(args, cfg, predictor, seg_meta, info: dict, check: dict, weights: dict) -> dict:
    from mlps_dist.core.draw import palette_for
    from mlps_dist.predict.predictor import training_patch_size

    num_classes = int(seg_meta["num_classes"])
    return {
        "format": FORMAT_VERSION,
        "classes": list(info.get("classes") or seg_meta.get("classes")),
        "num_classes": num_classes,
        "palette": [list(c) for c in palette_for(num_classes, info)],
        "ignore_index": int(info.get("ignore_index", 255)),
        "mpp": info.get("mpp"),
        "patch_size": training_patch_size(cfg, info),
        "image_size": int(cfg.data.image_size or 0),
        "gate": predictor.gated,
        "gate_threshold": predictor.gate_threshold if predictor.gated else None,
        "refine": predictor.refine,  # colour-affinity refinement inside the graph (evaluate.refine), or null
        # data.stain: the reference deploy.OnnxModel maps images onto before the graph, or null
        "stain": predictor.stain.reference if predictor.stain is not None else None,
        "normalisation": {
            "formula": "(image / 255 - mean) / std, inside the graph",
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", 3, "H", "W"], "channels": "RGB"},
        "outputs": {
            "classes": "int64 (N, H, W)",
            "scores": "float32 (N, C, H, W) softmax after the gate",
            "presence": "float32 (N, C) gate classifier probabilities",
        },
        "opset": args.opset,
        "checkpoint": args.checkpoint,
        "metrics": read_metrics(Path(args.run)),
        "weights": weights,
        "self_check": check,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions("mlps-dist", "torch", "onnx", "onnxruntime"),
    }


def copy_model_card(run: Path, out: Path) -> None:
    card = layout.model_card_file(run)
    if card.is_file():
        atomic_write_bytes(out / layout.MODEL_CARD_NAME, card.read_bytes())
        return
    from mlps_dist.run.model_card import render

    atomic_write_bytes(out / layout.MODEL_CARD_NAME, render(run).encode("utf-8"))


def run_export(args) -> dict:
    from mlps_dist.config import load_config
    from mlps_dist.data.shards import open_split
    from mlps_dist.predict.predictor import create_predictor

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise MlpsError(f"the export needs onnx and onnxruntime ({exc}): pip install 'mlps-dist[export]'") from exc
    run, out = Path(args.run), Path(args.out)
    cfg = load_config(layout.existing_config_file(run))
    reader = open_split(cfg.data.root, args.check_split)  # before the export: no test patches, no model
    predictor, seg_meta = create_predictor(run, cfg, checkpoint=args.checkpoint, num_classes=reader.num_classes)
    seg_file = str(Path(seg_meta["path"]).relative_to(run))
    weights = {"segmenter": {"file": seg_file, "sha256": sha256_file(seg_meta["path"])}}
    if predictor.gated:
        chosen = seg_meta["classifier"]["file"]  # classifier.checkpoint: best.pt or model.pt
        weights["classifier"] = {"file": chosen, "sha256": sha256_file(layout.resolve(run, chosen))}
    out.mkdir(parents=True, exist_ok=True)
    final = out / "model.onnx"
    staged = tmp_path(final)
    try:
        export_graph(DeployGraph.from_predictor(predictor), staged, args.opset)
        patches = len(reader) if not args.check_limit else min(args.check_limit, len(reader))
        check = self_check(predictor, staged, check_patches(reader, args.check_limit), patches)
        check["split"] = args.check_split
        print(
            f"self-check on {check['samples']} {args.check_split} patches: classes agree on "
            f"{100 * check['class_agreement']:.4f} % of pixels, largest score difference {check['max_score_diff']:.3g}"
        )
        if not check["class_agreement"] >= MIN_AGREEMENT:
            raise ExportCheckError(
                f"onnxruntime and torch agree on only {100 * check['class_agreement']:.4f} % of "
                f"pixels (need {100 * MIN_AGREEMENT:.1f} %); no model.onnx written"
            )
        weights["model.onnx"] = {"file": "model.onnx", "sha256": sha256_file(staged)}
        record = model_record(args, cfg, predictor, seg_meta, reader.info, check, weights)
        from mlps_dist.deploy.onnx_model import record_digest

        record["digest"] = record_digest(record)  # OnnxModel refuses a hand-edited or mismatched model.json
        atomic_write_json(out / "model.json", record)
        copy_model_card(run, out)
        commit_file(staged, final)  # last: a model.onnx exists only next to its model.json and card
    finally:
        staged.unlink(missing_ok=True)
        reader.close()
    return record


def export(args) -> dict:
    """``run_export`` with ``args.out`` claimed and locked first (``mlps export``: the flags
    are mlps_dist/cli/export.py's); a missing file or bad value is an InputError (exit 2)."""
    from mlps_dist.core.toolout import tool_output

    try:
        # --out is not the run (nor inside or around it), is ours or empty, and one export at a time.
        with tool_output(args.out, [args.run], "export", owned_if=("model.json", "model.onnx"), in_flag="--run"):
            return run_export(args)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc
