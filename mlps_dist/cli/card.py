"""``mlps card --run RUN``: write the model card of a trained run, RUN/MODEL_CARD.md
(mlps_dist.run.model_card: data, method and settings, results, intended use and limits,
software and hardware, how to reproduce). mlps pipeline writes it when the run finishes;
rerun this after evaluating again, or for a run made before the card existed."""

from __future__ import annotations

from mlps_dist.cli.launching import guarded

HELP = "write the model card of a trained run (RUN/MODEL_CARD.md)"


def build_parser():
    from mlps_dist.cli import parser

    p = parser("card", HELP)
    p.add_argument("--run", required=True, help="run directory (config.yaml, metrics/, model files)")
    return p


def main(argv: list[str]) -> int:
    return guarded(lambda: _card(build_parser().parse_args(argv)))


def _card(args) -> int:
    from mlps_dist.core import layout
    from mlps_dist.run import model_card

    layout.existing_config_file(args.run)  # not a run directory: named in one line, exit 2
    print(f"wrote {model_card.write(args.run)}")
    return 0
