"""Entry point for ``python -m udpbindd``."""

from udpbindd.cli import main

raise SystemExit(main())
