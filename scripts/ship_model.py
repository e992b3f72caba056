"""Ship a trained student inside the package: ``rdcd ship student`` (rdcd.ship.ship_student).

    python scripts/ship_model.py --run runs/NAME --name rdcd-tf_efficientnet_lite0-128 \
        --valbench runs/valbench [--default] [--devbench ../shared/data/devbench]
"""
from __future__ import annotations

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["ship", "student", *sys.argv[1:]]))
