#!/usr/bin/env python
"""Train SAPSAM networks: `python scripts/train.py --task signs --axis axial` (see --help)."""

import sys

from sapsam_jax.job import main

if __name__ == "__main__":
    sys.exit(main())
