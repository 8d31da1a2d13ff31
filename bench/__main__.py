"""`python -m adpa.bench NAME [--flags]`: the same as `adpa bench NAME [--flags]`."""

import sys

from adpa.bench import main

sys.exit(main())
