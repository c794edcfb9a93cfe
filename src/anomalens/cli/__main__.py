"""``python -m anomalens.cli``: the command line."""

from . import main

main()
