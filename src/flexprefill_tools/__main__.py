"""``python -m flexprefill_tools ...``: the ``flexprefill`` command."""

from .cli import main

raise SystemExit(main())
