"""What each artefact of a run directory was made from, and whether it is finished for the
current config (where the artefacts live: mlps_dist.core.layout).

A **stamp** is written last, when a stage has finished: the fingerprints of its inputs
(the config keys that shape it, the shards' info.json and index files, the upstream
artefact's digest) and of its output files. A stage is finished when its stamp matches
what the current config and inputs would produce; a changed upstream artefact changes the
inputs of everything downstream, so those become stale too. Stale training stages are
never silently reused nor silently overwritten: the stage refuses and names the keys
(start a new run directory, or ``mlps pipeline ... --restart-from STAGE``); stale metrics are
simply computed again.

Which config keys shape which stage: see ``SHAPING`` and ``OPERATIONAL`` (docs/architecture.md).

On the command line: ``mlps status CONFIG RUN`` (each stage's state; ``--progress`` the
token of ``progress_token``) and ``mlps pipeline ... --restart-from STAGE`` (``restart``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlps_dist.config import Config
from mlps_dist.core import layout, records
from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_write_json, fsync_dir, sha256_file
from mlps_dist.core.records import flatten

STAGES = ("classifier", "masks", "segmenter", "evaluate")
UPSTREAM = {"masks": "classifier", "segmenter": "masks", "evaluate": "segmenter"}
WRITTEN_BY = "mlps-dist"

# Config keys (dotted) of each stage's result, by prefix. A key listed here but matched by
# OPERATIONAL below does not count.
SHAPING = {
    "classifier": ("seed", "data.", "classifier."),
    "masks": ("data.mean", "data.std", "data.image_size", "data.stain.", "masks.", "classifier.checkpoint"),
    "segmenter": ("seed", "data.", "segmenter."),
    "evaluate": (
        "data.mean",
        "data.std",
        "data.image_size",
        "data.stain.",
        "segmenter.precision",
        "evaluate.",
        "classifier.checkpoint",
    ),
}
# Keys under a stage's prefix that belong to a later stage: which stage-1 file the masks and
# the gate use does not change the classifier stage itself.
LATER = {"classifier": ("classifier.checkpoint",)}
# Keys that never change a result: where things are (data.root is fingerprinted by content
# instead), how fast and how verbosely they run, what is drawn for TensorBoard. The torch
# and DALI loaders yield identical batches by contract, so data.loader is operational too
# (for PNG shards at the stored size; JPEG decoders and resizes differ by rounding, a grey
# level or less: not a different result, as the GPU tier states).
OPERATIONAL = (
    "run_dir",
    "dist.*",
    "data.root",
    "data.num_workers",
    "data.dali_source_workers",
    "data.loader",
    "*.log_every_steps",
    "*.ckpt_every_steps",
    "*.keep_last",
    "*.cam_images",
    "*.vis_images",
    "masks.batch_size",
    "masks.export_reference",
    "masks.quality_splits",
    "masks.skip_bad",
    "evaluate.batch_size",
    "evaluate.splits",
    "data.max_downscale",  # acts through the data.image_size it resolves to (config.resolve_image_size)
)
# The shard splits each stage reads.
SPLITS = {"classifier": ("train", "val"), "masks": ("train",), "segmenter": ("train", "val")}


class StaleError(MlpsError):
    """An artefact (or checkpoint) in the run directory was made from other inputs."""

    shared = True


# ---------------------------------------------------------------- fingerprints


def is_operational(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in OPERATIONAL)


def shaping_config(config: dict, stage: str) -> dict:
    """The dotted config keys that shape ``stage``'s result (``config`` = Config.to_dict())."""
    flat = flatten(config)
    return {
        k: v
        for k, v in sorted(flat.items())
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in SHAPING[stage])
        and not is_operational(k)
        and k not in LATER.get(stage, ())
    }


def shards_fingerprint(root: str | Path, splits) -> dict:
    """Class names, ignore index and, per split, a digest of info.json's entry and the
    index files (offsets and sizes of every member: rebuilt shards change it)."""
    from mlps_dist.data.shards import read_info, shard_file_name

    root = Path(root)
    info = read_info(root)
    out = {"classes": list(info["classes"]), "ignore_index": info.get("ignore_index"), "splits": {}}
    for split in splits:
        entry = info.get("splits", {}).get(split)
        if entry is None:
            continue
        digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
        for shard in entry.get("shards", []):
            idx = root / shard_file_name(root, shard, "idx")
            digest.update(idx.read_bytes() if idx.is_file() else b"missing")
        out["splits"][split] = digest.hexdigest()[:32]
    return out


def read_stamp(run_dir: str | Path, stage: str, split: str = "") -> dict | None:
    path = layout.stamp_file(run_dir, stage, split)
    try:
        stamp = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # damaged: never matches
    return stamp if isinstance(stamp, dict) and stamp.get("written_by") == WRITTEN_BY else {}


class NotReady(MlpsError):
    """The upstream stage ``args[0]`` is not finished (or stale): a state for ``status``,
    an error for a stage that needs it."""

    def __str__(self) -> str:
        return f"the {self.args[0]} stage is not finished for this config; run or resume it first"


def files_digest(stage: str, files: dict[str, str]) -> str:
    """The digest of an artefact: its stage and the sha256 of each of its files."""
    return hashlib.sha256(json.dumps({"stage": stage, "files": files}, sort_keys=True).encode()).hexdigest()


def _finished_unstamped(run_dir: str | Path, stage: str) -> bool:
    """A final artefact placed without a stamp (by hand: a model file copied in, a test's
    fixture): its files are all there is to fingerprint."""
    if stage in ("classifier", "segmenter"):
        return layout.model_file(run_dir, stage).is_file()
    if stage == "masks":
        try:
            return bool(json.loads(layout.masks_manifest(run_dir).read_text()).get("complete"))
        except (OSError, ValueError):
            return False
    return False


def upstream_digest(cfg: Config, stage: str) -> str:
    """The digest of ``stage``'s artefact when it is finished *for the current config*
    (its own stamp matches, recursively up the chain), or computed from its files when it
    has no stamp at all; NotReady when it is unfinished or stale."""
    stamp = read_stamp(cfg.run_dir, stage)
    if stamp is None:  # no provenance to check: the files are all there is
        if _finished_unstamped(cfg.run_dir, stage):
            return files_digest(stage, {p.name: sha256_file(p) for p in layout.output_files(cfg.run_dir, stage)})
        raise NotReady(stage)
    if status(cfg, stage).state == "done":
        return stamp["digest"]
    raise NotReady(stage)


def expected_inputs(cfg: Config, stage: str, split: str = "") -> dict:
    """What a stamp of ``stage`` must record to be the result of the current config."""
    inputs = {
        "config": shaping_config(cfg.to_dict(), stage),
        "shards": shards_fingerprint(cfg.data.root, SPLITS.get(stage, (split,))),
    }
    if stage in UPSTREAM:
        inputs["upstream"] = {UPSTREAM[stage]: upstream_digest(cfg, UPSTREAM[stage])}
    if stage == "evaluate" and cfg.evaluate.gate:
        inputs["upstream"]["classifier"] = upstream_digest(cfg, "classifier")
    return inputs


def config_defaults() -> dict:
    """The current defaults as an ``inputs`` record holds them (records.changed's ``defaults``)."""
    return {f"config.{key}": value for key, value in flatten(Config().to_dict()).items()}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Human names of what differs between two ``inputs`` records (a config key the old
    record lacks counts as its default: records.changed)."""
    names = []
    for key, (was, now) in records.changed(old, new, config_defaults()).items():
        if key.startswith("config."):
            names.append(f"{key[7:]} ({was!r} -> {now!r})")
        elif key.startswith("shards."):
            names.append("the shards in data.root" + (f" ({key.split('.')[-1]} split)" if ".splits." in key else ""))
        elif key.startswith("upstream."):
            names.append(f"the {key[9:]} artefact ({layout.FOLDERS[key[9:]]}/)")
    return list(dict.fromkeys(names))


def checkpoint_inputs(cfg: Config, stage: str) -> dict:
    """What a training checkpoint of ``stage`` records: the inputs its stamp will hold (none
    for a training task that is not a stage of the pipeline)."""
    return expected_inputs(cfg, stage) if stage in SHAPING else {}


def check_same_inputs(cfg: Config, stage: str, state: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of ``stage`` (its ``state``, read from ``path``) written
    for another schedule or other inputs (the two runs would mix): StaleError naming the keys."""
    if stage not in SHAPING:
        return
    if "inputs" not in state:
        raise StaleError(
            f"checkpoint {path} records no inputs (written by a release of mlps-dist before they were "
            f"recorded), so it cannot be checked against this config: {restart_hint(stage)}"
        )
    changed = changed_keys(state["inputs"], checkpoint_inputs(cfg, stage))
    if changed:
        raise StaleError(
            f"checkpoint {path} was written with other settings; changed: {'; '.join(changed)}. Resuming it would "
            f"mix two schedules: restore those settings to resume, or {restart_hint(stage)}"
        )


def write_stamp(cfg: Config, stage: str, inputs: dict, split: str = "") -> dict:
    """Record that ``stage`` finished from ``inputs`` (rank 0, after its outputs are durable)."""
    files = {}
    for path in layout.output_files(cfg.run_dir, stage, split):
        st = path.stat()
        files[path.name] = {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = files_digest(stage, {k: v["sha256"] for k, v in files.items()})
    stamp = {
        "written_by": WRITTEN_BY,
        "stage": stage,
        "split": split,
        "inputs": inputs,
        "files": files,
        "digest": digest,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(layout.stamp_file(cfg.run_dir, stage, split), stamp)
    return stamp


def files_intact(run_dir: str | Path, stage: str, stamp: dict, split: str = "") -> bool:
    """The stamped files are still there, unchanged (size and mtime; the hash when they moved)."""
    current = {p.name: p for p in layout.output_files(run_dir, stage, split)}
    recorded = stamp.get("files", {})
    if set(current) != set(recorded):
        return False
    for name, rec in recorded.items():
        st = current[name].stat()
        if st.st_size != rec["size"]:
            return False
        if st.st_mtime_ns != rec["mtime_ns"] and sha256_file(current[name]) != rec["sha256"]:
            return False
    return True


# ---------------------------------------------------------------- status


@dataclass
class Status:
    stage: str
    state: str  # done | todo | waiting | stale
    message: str = ""
    changed: list[str] = field(default_factory=list)


def restart_hint(stage: str) -> str:
    return (
        f"start a new run directory, or rerun mlps pipeline with --restart-from {stage} (moves {stage} and the "
        f"stages after it to RUN/superseded/)"
    )


def status(cfg: Config, stage: str, split: str = "") -> Status:
    """Where ``stage`` stands for the current config (evaluate: all of evaluate.splits)."""
    if stage == "evaluate" and not split:
        states = [status(cfg, stage, s) for s in cfg.evaluate.splits]
        for want in ("waiting", "stale", "todo"):
            hit = [s for s in states if s.state == want]
            if hit:
                return Status(stage, want, "; ".join(s.message for s in hit), sum((s.changed for s in hit), []))
        return Status(stage, "done", ", ".join(str(layout.metrics_file(cfg.run_dir, s)) for s in cfg.evaluate.splits))
    where = layout.stamp_file(cfg.run_dir, stage, split)
    try:
        want = expected_inputs(cfg, stage, split)
    except NotReady as exc:
        return Status(stage, "waiting", f"{stage}: waits for the {exc.args[0]} stage")
    stamp = read_stamp(cfg.run_dir, stage, split)
    if stamp is None:
        return Status(stage, "todo", f"{stage}: not finished yet")
    if stamp == {}:
        return Status(
            stage, "stale", f"{where} is damaged or not written by this program; {restart_hint(stage)}", ["stamp"]
        )
    changed = changed_keys(stamp.get("inputs", {}), want)
    if not changed and not files_intact(cfg.run_dir, stage, stamp, split):
        changed = [f"the files in {layout.stage_dir(cfg.run_dir, stage)} (changed since {where} was written)"]
    if changed:
        what = f"{stage}" + (f" ({split})" if split else "")
        if stage == "evaluate":
            return Status(stage, "todo", f"{what}: inputs changed ({'; '.join(changed)}): evaluated again", changed)
        return Status(
            stage,
            "stale",
            f"{what} in {cfg.run_dir} was made from other inputs; changed: "
            f"{'; '.join(changed)}. It is not reused or overwritten: {restart_hint(stage)}",
            changed,
        )
    return Status(stage, "done", str(where))


def require_runnable(cfg: Config, stage: str) -> Status:
    """For a stage about to run: its status, or StaleError when the run dir holds a stale
    version of it or an unfinished/stale upstream."""
    st = status(cfg, stage)
    if st.state == "stale":
        raise StaleError(st.message)
    if st.state == "waiting":
        up = st.message.rsplit(" ", 2)[-2]  # "...: waits for the <stage> stage"
        up_st = status(cfg, up)
        if up_st.state == "stale":
            raise StaleError(f"{stage} needs the {up} stage, but {up_st.message}")
        raise StaleError(
            f"stage {STAGES.index(up) + 1} is not finished ({up} in {cfg.run_dir}): run or resume "
            f"it first (mlps stage {up} CONFIG RUN, or mlps pipeline CONFIG RUN), or give --run a run "
            f"that has it"
        )
    return st


# ---------------------------------------------------------------- restart


def restart(cfg: Config, stage: str) -> Path | None:
    """Move ``stage`` and every stage after it to RUN/superseded/<time>/ (nothing is deleted)."""
    run_dir = Path(cfg.run_dir)
    moving = [layout.stage_dir(run_dir, s) for s in STAGES[STAGES.index(stage) :]]
    moving = [p for p in moving if p.exists()]
    if not moving:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    layout.superseded_dir(run_dir).mkdir(exist_ok=True)
    for attempt in itertools.count():  # two restarts within a second get folders of their own
        target = layout.superseded_dir(run_dir) / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            target.mkdir()
            break
        except FileExistsError:
            continue
    for path in moving:
        os.rename(path, target / path.name)
    # Stage 2's quality report lives in metrics/ beside the evaluation's files; it belongs to
    # the masks, so it stays with them when only the stages after the masks are redone.
    report = layout.masks_report_file(target)  # the moved folders keep the run's layout
    if STAGES.index(stage) > STAGES.index("masks") and report.is_file():
        kept = layout.masks_report_file(run_dir)
        kept.parent.mkdir()
        os.rename(report, kept)
        fsync_dir(kept.parent)
    fsync_dir(target)
    fsync_dir(run_dir)
    return target


def progress_token(cfg: Config, stage: str) -> str:
    """A string that changes whenever ``stage`` makes durable progress (for requeue limits)."""
    parts = []
    if read_stamp(cfg.run_dir, stage) if stage != "evaluate" else False:
        parts.append("stamp")
    ckpts = layout.checkpoints_dir(cfg.run_dir, stage)
    if ckpts.is_dir():
        parts += sorted(p.name for p in ckpts.glob("step-*") if not p.name.endswith(".tmp"))[-1:]
    if stage == "masks" and layout.masks_dir(cfg.run_dir).is_dir():
        parts.append(str(len(list(layout.masks_dir(cfg.run_dir).glob("*.tar")))))
    if stage == "evaluate":
        parts += sorted(p.name for p in layout.stage_dir(cfg.run_dir, stage).glob("*.stamp.json"))
    return ",".join(parts) or "none"
