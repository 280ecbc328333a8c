"""``python -m psm_mapping`` = ``psm-map``."""
import sys

from .cli import main

sys.exit(main())
