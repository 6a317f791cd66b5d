"""The ``mlps`` command: one module per subcommand, each with ``HELP`` (its one-line summary)
and ``main(argv) -> int`` building its own parser (``prog="mlps CMD"``, defaults shown).

``COMMANDS`` is the dispatcher's table (mlps_dist/__main__.py): subcommand -> module. The
stage names run a stage module's ``main(argv)`` directly (what ``mlps stage`` and torchrun
call); their summaries are written here, because the stage modules import torch and
``mlps --help`` must stay instant.
"""

from __future__ import annotations

import argparse

from mlps_dist.core.helpformat import DefaultsHelp

# name -> (module, summary when the module itself is too heavy to import for the listing)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "pipeline": ("mlps_dist.cli.pipeline", None),
    "stage": ("mlps_dist.cli.stage", None),
    "status": ("mlps_dist.cli.status", None),
    "classifier": (
        "mlps_dist.stages.train_classifier",
        "stage 1: train the patch classifier (CONFIG --run RUN [key=value ...])",
    ),
    "masks": ("mlps_dist.stages.generate_masks", "stage 2: pseudo masks of the training patches (CONFIG --run RUN)"),
    "segmenter": (
        "mlps_dist.stages.train_segmenter",
        "stage 3: train the segmenter on the pseudo masks (CONFIG --run RUN)",
    ),
    "evaluate": ("mlps_dist.stages.evaluate", "stage 4: test metrics of the trained run (CONFIG --run RUN)"),
    "synthetic": ("mlps_dist.cli.synthetic", None),
    "synthetic-slides": ("mlps_dist.cli.synthetic_slides", None),
    "mosaics": ("mlps_dist.cli.mosaics", None),
    "shards": ("mlps_dist.cli.shards", None),
    "tile": ("mlps_dist.cli.tile", None),
    "inspect": ("mlps_dist.cli.inspect", None),
    "segment": ("mlps_dist.cli.segment", None),
    "infer": ("mlps_dist.cli.infer", None),
    "export": ("mlps_dist.cli.export", None),
    "visualize": ("mlps_dist.cli.visualize", None),
    "config": ("mlps_dist.cli.config", None),
    "card": ("mlps_dist.cli.card", None),
    "weights": ("mlps_dist.cli.weights", None),
}


def parser(command: str, help_text: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser every subcommand starts from: ``mlps COMMAND``, its summary, defaults shown."""
    return argparse.ArgumentParser(
        prog=f"mlps {command}", description=help_text, epilog=epilog, formatter_class=DefaultsHelp
    )
