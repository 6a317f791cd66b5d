#!/usr/bin/env python
"""Weakly-supervised benchmark patches from class-per-folder tiles: ``mlps mosaics`` under its tool name.

    python tools/make_mosaics.py --tiles ../shared/real/kather2016_dev --out data/real \
        --classes TE=TUM,NEC=DEB,LYM=LYM,TAS=STR --background BACK \
        --train 600 --val 40 --test 80 --split-by-source --seed 0
    mlps shards --layout luad --src data/real --out data/real/shards --mpp 0.495

The same flags, defaults and output as ``mlps mosaics`` (``--help`` lists them); the code is
mlps_dist/cli/mosaics.py. docs/real_tissue.md describes the patches, masks and splits.
"""

import sys

from mlps_dist.cli.mosaics import main

if __name__ == "__main__":
    sys.exit(main())
