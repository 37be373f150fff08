"""Speed of FlexPrefill on a GPU, in one run: ``python benchmarks/suite.py --out bench-out``.

A thin wrapper around :func:`harness.main`; see benchmarks/README.md for what is measured
and how.
"""

import sys

from harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
