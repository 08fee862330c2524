"""`python -m agent.cli`: the same as the `tdn` command."""

from agent.cli import main

raise SystemExit(main())
