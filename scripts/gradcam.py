#!/usr/bin/env python
"""Grad-CAM figures and 3-D PSAMs: `python scripts/gradcam.py --workdir W --study S`.

See --help and the README, "Explaining predictions".
"""

import sys

from sapsam_jax.explain import main

if __name__ == "__main__":
    sys.exit(main())
