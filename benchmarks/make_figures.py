"""Regenerate every figure under docs/images/ (shown on docs/figures.md), one command:

    python benchmarks/make_figures.py            # needs the plot extra (matplotlib)

* obs_pruning.png: ``examples/obs_pruning.py --plot`` (test loss and accuracy against
  sparsity for magnitude, independent and joint OBS pruning);
* kronecker_paper_frobenius.png, kronecker_paper_spectrum.png:
  ``examples/kronecker_paper.py --plot docs/images`` (the Kronecker approximations' errors
  per layer over training, shown on docs/kronecker.md).
* kronecker_training.png, kronecker_curves.png:
  ``examples/kronecker_training.py --controls --plot docs/images`` (natural-gradient training
  with each Kronecker method against Adam and SGD; about 5 minutes).

Each step prints how long it took; a bar shows the steps on a terminal.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mfac_linalg._progress import progress  # noqa: E402

IMAGES = ROOT / "docs" / "images"
STEPS = [
    ("obs_pruning.png", [sys.executable, str(ROOT / "examples" / "obs_pruning.py"), "--plot",
                         str(IMAGES / "obs_pruning.png")]),
    ("kronecker_paper_*.png", [sys.executable, str(ROOT / "examples" / "kronecker_paper.py"),
                               "--plot", str(IMAGES)]),
    ("kronecker_training.png, kronecker_curves.png",
     [sys.executable, str(ROOT / "examples" / "kronecker_training.py"), "--controls", "--plot",
      str(IMAGES)]),
]


def main() -> int:
    if importlib.util.find_spec("matplotlib") is None:
        print('make_figures needs matplotlib: pip install "mfac-linalg[plot]"', file=sys.stderr)
        return 2
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, cmd in progress(STEPS, desc="figures"):
        t = time.perf_counter()
        print(f"{name}: {' '.join(pathlib.Path(c).name for c in cmd[1:])} ...", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT,
                       env={**os.environ, "MPLBACKEND": "Agg"})
        print(f"{name}: written in {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
