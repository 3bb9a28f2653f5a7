"""`python -m cli ...` is the `convoy` command."""

import sys

from cli.main import main

sys.exit(main())
