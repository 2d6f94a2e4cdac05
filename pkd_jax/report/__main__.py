import sys

from pkd_jax.report.cli import main

sys.exit(main())
