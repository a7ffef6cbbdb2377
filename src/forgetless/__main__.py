"""`python -m forgetless ...`: the `forgetless` command (forgetless.cli), for an environment whose scripts
folder is not on PATH."""

import sys

from forgetless.cli import main

sys.exit(main())
