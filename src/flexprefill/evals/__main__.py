"""``python -m flexprefill.evals ...``: see :func:`flexprefill.evals.main`."""

from . import main

raise SystemExit(main())
