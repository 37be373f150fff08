"""``python -m flexprefill_tools.evals ...``: see :func:`flexprefill_tools.evals.main`."""

from . import main

raise SystemExit(main())
