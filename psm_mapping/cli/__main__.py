"""``python -m psm_mapping.cli`` = ``psm-map``."""
import sys

from . import main

sys.exit(main())
