"""Ship a projection model (a model + PCA whitening fitted on the training pool) inside the package:
``rdcd ship projection`` (rdcd.ship.ship_projection).

    python scripts/ship_projection.py --spec sscd-distilled@160+pcaw128 --name sscd-distilled-pcaw128 \
        --background runs/split/train.txt --valbench runs/valbench --devbench ../shared/data/devbench [--default]
"""
from __future__ import annotations

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["ship", "projection", *sys.argv[1:]]))
