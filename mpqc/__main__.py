"""``python -m mpqc`` runs the CLI."""

from mpqc.cli import main

raise SystemExit(main())
