"""``python -m gateway serve``."""

from gateway.cli import main

raise SystemExit(main())
