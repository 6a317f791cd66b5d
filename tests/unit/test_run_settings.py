"""Every consumer of a run reads the settings its metrics were measured with: an evaluation
with changed evaluate.* settings writes them where infer, export, the slide tools and the
model card read them."""

from __future__ import annotations

import json

import yaml
from trained_runs import make_run  # noqa: E402

from mlps_dist.config import load_config  # noqa: E402
from mlps_dist.stages import evaluate  # noqa: E402


def test_a_re_evaluation_with_other_settings_is_what_consumers_read(tmp_path, tiny_shards):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    base = [
        "--config",
        str(run / "config.yaml"),
        f"run_dir={run}",
        "data.num_workers=0",
        "evaluate.splits=[val]",
        "evaluate.batch_size=4",
    ]
    assert evaluate.main(base + ["evaluate.refine.enabled=true", "evaluate.refine.iterations=2"]) == 0
    assert load_config(run / "config.yaml").evaluate.refine.enabled
    assert evaluate.main(base + ["evaluate.refine.enabled=false", "evaluate.gate_threshold=0.3"]) == 0
    for path in (run / "config.yaml", run / "metrics" / "config.yaml"):
        ev = yaml.safe_load(path.read_text())["evaluate"]
        assert ev["refine"]["enabled"] is False and ev["gate_threshold"] == 0.3
    from mlps_dist.predict.predictor import create_predictor
    from mlps_dist.run.model_card import render

    assert "refined along the patch's colours before the argmax: no" in render(run)
    predictor, _ = create_predictor(run)
    assert predictor.gate_threshold == 0.3 and not predictor.refine
    # A config.yaml that lacks a key (written before it existed) reads it as its default.
    values = yaml.safe_load((run / "config.yaml").read_text())
    del values["evaluate"]["refine"]
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    assert "refined along the patch's colours before the argmax: no" in render(run)


def test_after_a_restart_from_evaluate_every_consumer_reads_what_the_metrics_measured(tmp_path, tiny_shards):
    """A finished run re-evaluated after ``--restart-from evaluate`` with other evaluate.*
    settings: RUN/config.yaml (what infer --run, the slide model, export and the model card
    read) holds the settings recorded in the evaluation's stamp, not the first evaluation's."""
    from argparse import Namespace

    from mlps_dist.core import layout
    from mlps_dist.deploy.infer import RunModel
    from mlps_dist.predict.slide_model import create_slide_model
    from mlps_dist.run import artifacts
    from mlps_dist.run.model_card import render

    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    base = [
        "--config",
        str(layout.config_file(run)),
        f"run_dir={run}",
        "data.num_workers=0",
        "evaluate.splits=[val]",
        "evaluate.batch_size=4",
    ]
    assert evaluate.main(base + ["evaluate.refine.enabled=true", "evaluate.refine.iterations=2"]) == 0
    changed = base + ["evaluate.refine.enabled=false", "evaluate.gate_threshold=0.3"]
    assert artifacts.restart(load_config(layout.config_file(run), changed[2:]), "evaluate") is not None
    assert not layout.metrics_file(run, "val").exists()
    assert evaluate.main(changed) == 0
    measured = json.loads(layout.stamp_file(run, "evaluate", "val").read_text())["inputs"]["config"]
    assert measured["evaluate.refine.enabled"] is False and measured["evaluate.gate_threshold"] == 0.3
    read = load_config(layout.config_file(run))
    assert {k: v for k, v in artifacts.shaping_config(read.to_dict(), "evaluate").items()} == measured
    infer_model = RunModel(Namespace(run=str(run), checkpoint=None, no_gate=False, gate_threshold=None))
    slide_model = create_slide_model(run)
    for predictor in (infer_model.predictor, slide_model.predictor):
        assert predictor.gate_threshold == 0.3 and not predictor.refine
    assert "refined along the patch's colours before the argmax: no" in render(run)
