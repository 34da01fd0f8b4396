"""``python -m cttrace`` runs the CLI."""

from cttrace.cli import main

main()
