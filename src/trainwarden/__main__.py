"""`python -m trainwarden …`: the same command line as the `trainwarden` script."""

import sys

from trainwarden.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
