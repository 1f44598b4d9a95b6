"""``python -m corevault.capture`` and ``corevault-capture``: the kernel's pipe handler."""

import sys

from corevault.capture.handler import main

if __name__ == "__main__":
    sys.exit(main())
