"""Speed of FlexPrefill on a GPU, in one run: ``python benchmarks/bench_attention.py --out bench-out``.

A thin wrapper around :func:`flexprefill.benchmarking.main` (also ``flexprefill bench``);
see benchmarks/README.md for what is measured and how.
"""

import sys

from flexprefill.benchmarking import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
