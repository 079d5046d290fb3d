"""`python -m specpipe.launch.bench [flags]`: the same as `specpipe bench [flags]`."""

import sys

from specpipe.launch.bench.run import main

sys.exit(main())
