import sys

from tuneqdm_core.cli import main

sys.exit(main())
