"""``python -m jbptt``: the same as the ``jbptt`` command."""

import sys

from jbptt._cli.main import main

__all__ = ()

if __name__ == "__main__":
  sys.exit(main())
