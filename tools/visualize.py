#!/usr/bin/env python
"""Contact sheets of a run: ``mlps visualize`` under its tool name.

    python tools/visualize.py --run runs/demo --split test --cams --out runs/demo/test_sheet.png

The same flags, defaults and output as ``mlps visualize`` (``--help`` lists them): per patch the
image, the stain-matched image, its mask, the CAMs (``--cams``), the pseudo masks and the
prediction. The code is mlps_dist/cli/visualize.py.
"""

import sys

from mlps_dist.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
