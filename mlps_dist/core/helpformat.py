"""The help format of every ``mlps`` command, the stages' included: each flag's default shown.

Here rather than in cli/ because the stage parser (config.parse_cli) sits below cli/ and
must format its help the same way.
"""

from __future__ import annotations

import argparse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default in its help ("(default: 224)"), except where there is none to show
    (required flags, switches, None); epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.required or default is None or default is False or default == "" or default is argparse.SUPPRESS:
            return text
        if "%(default)" in text or "default:" in text:
            return text
        return super()._get_help_string(action) if text else "(default: %(default)s)"
