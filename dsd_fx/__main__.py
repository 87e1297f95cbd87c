import sys

from dsd_fx.cli import main

sys.exit(main())
