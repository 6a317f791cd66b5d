"""``mlps config CONFIG [key=value ...]``: the config resolved (defaults <- YAML <- overrides) and
validated, printed as YAML; ``--get KEY`` prints one value, ``--check`` also checks it against
the models and the shards (mlps_dist.stages.session.check), ``--reference`` prints the reference
of every key (docs/config.md, mlps_dist.cli.config_reference).
"""

from __future__ import annotations

from mlps_dist.cli.launching import guarded, load
from mlps_dist.core.errors import InputError

HELP = "print a config resolved (YAML), one value of it (--get), check it (--check) or every key (--reference)"
EPILOG = """examples:
  mlps config configs/demo.yaml classifier.epochs=3        # the resolved YAML
  mlps config configs/demo.yaml --get dist.shutdown_timeout_s
  mlps config configs/luad.yaml data.root=/data/luad --check
  mlps config --reference > docs/config.md"""


def build_parser():
    from mlps_dist.cli import parser

    p = parser("config", HELP, EPILOG)
    p.add_argument("config", nargs="?", metavar="CONFIG", help="experiment YAML (not needed for --reference)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (classifier.epochs=2)")
    p.add_argument("--run", help="run directory (sets run_dir)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--get", metavar="KEY", help="print this one dotted key's value (lists in YAML flow style)")
    what.add_argument(
        "--check",
        action="store_true",
        help="check it against the models and data.root too: model names, CAM layers, classes, splits",
    )
    what.add_argument(
        "--reference",
        action="store_true",
        help="print every key with type, default and meaning (Markdown, as docs/config.md)",
    )
    return p


def main(argv: list[str]) -> int:
    return guarded(lambda: _config(build_parser().parse_intermixed_args(argv)))


def _config(args) -> int:
    if args.reference:
        from mlps_dist.cli.config_reference import reference

        if args.config or args.overrides:
            raise InputError("mlps config --reference takes no CONFIG: it lists the defaults of every key")
        print(reference(), end="")
        return 0
    if not args.config:
        raise InputError("mlps config needs CONFIG, the experiment YAML (e.g. configs/demo.yaml)")
    cfg = load(args.config, args.overrides, args.run)
    if args.get:
        print(format_value(get_value(cfg.to_dict(), args.get)))
    elif args.check:
        from mlps_dist.stages.session import check

        check(cfg)
        print(f"{args.config}: ok (models, CAM layers, classes and splits of {cfg.data.root})")
    else:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def get_value(values: dict, key: str):
    """The value of a dotted key; an unknown one is named with the keys of its section."""
    value = values
    for depth, part in enumerate(key.split(".")):
        if not isinstance(value, dict) or part not in value:
            section = ".".join(key.split(".")[:depth]) or "the top level"
            known = ", ".join(value) if isinstance(value, dict) else "none: it is a value"
            raise InputError(f"--get: unknown key '{key}' (keys of {section}: {known})")
        value = value[part]
    return value


def format_value(value) -> str:
    """A value as a shell reads it: strings as they are, the rest as YAML/JSON (true, 0.01, [1, 2])."""
    from mlps_dist.cli.config_reference import format_value as formatted

    return formatted(value)
