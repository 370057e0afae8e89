"""`python -m orchestrator`: the operators' command-line tool (see orchestrator.cli)."""

from orchestrator.cli import main

main()
