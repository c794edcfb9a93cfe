"""``python -m anomalens``: the command line."""

from .cli import main

main()
