"""``python -m jbptt``: the same as the ``jbptt`` command."""

import sys

from jbptt.cli import main

if __name__ == "__main__":
  sys.exit(main())
