"""`python -m pipeline.cli` is the `rlhf` command."""

from pipeline.cli.main import main

raise SystemExit(main())
