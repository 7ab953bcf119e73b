"""`python -m bulk_explain ...` is `bulk-explain ...`."""

import sys

from bulk_explain.jobs.cli import main

sys.exit(main())
