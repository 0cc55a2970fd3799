"""``python -m tokenpool serve ...``: the same as the ``tokenpool`` command."""

from ._cli import main

raise SystemExit(main())
