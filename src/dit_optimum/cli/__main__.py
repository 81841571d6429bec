"""``python -m dit_optimum.cli``: the ``dit-optimum`` command (what ``torchrun ... -m`` needs)."""

from . import main

raise SystemExit(main())
