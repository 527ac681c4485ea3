"""`python -m proxy` is `authproxy`."""

from proxy.cli import main

raise SystemExit(main())
