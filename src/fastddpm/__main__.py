"""`python -m fastddpm ...`: the same as the `fastddpm` command."""
import sys

from .cli import main

sys.exit(main())
