import sys

from .entry import main  # (the CLI imported inside the Ctrl-C guard, as the console script)

sys.exit(main())
