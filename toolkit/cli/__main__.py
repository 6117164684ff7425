"""`python -m toolkit.cli` is the `bitfleet` command."""

from . import main

main()
