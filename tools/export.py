"""Export a trained run to ONNX with the gate inside: see mlps_dist/predict/export.py.

    python tools/export.py --run runs/luad --out export/luad [--opset 17] [--checkpoint best|last]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlps_dist.predict.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
