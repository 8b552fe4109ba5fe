"""`python -m vmlab` is the same as the `vmlab` console script."""

from vmlab.cli import main

raise SystemExit(main())
