"""Nothing in a run directory runs code when it is loaded: DeepSpeed's checkpoint files are
read with torch.load(weights_only=True) and an allow-list, so a crafted file whose digest
record was forged to match is refused and its payload never runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torchrun_helpers as jobs  # noqa: E402

from mlps_dist.train import checkpoint as ck  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = str(REPO / "tests" / "support" / "engine_worker.py")


class Evil:
    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_a_crafted_deepspeed_checkpoint_with_forged_digests_is_refused(tmp_path):
    run = tmp_path / "ds"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(run),
                "seed": 3,
                "segmenter": {
                    "epochs": 1,
                    "batch_size": 8,
                    "lr": 0.05,
                    "ckpt_every_steps": 3,
                    "log_every_steps": 1,
                    "parallel": "deepspeed",
                    "keep_last": 10,
                    "deepspeed_config": str(REPO / "configs/deepspeed/zero2.json"),
                },
            }
        )
    )
    first = jobs.run([WORKER, str(tmp_path / "out"), "--config", str(cfg), "--dropout", "0"], nproc=0)
    assert first.returncode == 0, first.stdout[-3000:]
    checkpoints = run / "regression" / "checkpoints"
    step = checkpoints / "step-00000003"
    # The genuine files load through the weights-only reader (a resume from step 3 works).
    (checkpoints / "latest").write_text("step-00000003")
    (run / "regression" / "model.pt").unlink()
    resumed = jobs.run([WORKER, str(tmp_path / "out"), "--config", str(cfg), "--dropout", "0"], nproc=0)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    # Now a payload, and a digest record forged to match it.
    flag = tmp_path / "CODE_RAN"
    with open(step / "ds" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
        pickle.dump(Evil(str(flag)), f)
    (step / ck.DS_DIGESTS).write_text(json.dumps({"written_by": "mlps-dist", "files": ck._ds_digests(step)}))
    (checkpoints / "latest").write_text("step-00000003")
    (run / "regression" / "model.pt").unlink()
    refused = jobs.run([WORKER, str(tmp_path / "out"), "--config", str(cfg), "--dropout", "0"], nproc=0)
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "DeepSpeed checkpoint file refused" in refused.stdout
    assert not flag.exists()
