"""``python -m gim_fast``: the same command line as ``gim-fast``."""
import sys

from .cli import main

sys.exit(main())
