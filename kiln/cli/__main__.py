"""`python -m kiln.cli …` is `kiln …`."""
import sys

from . import main

sys.exit(main())
