"""``python -m kloc_lens`` (and ``torchrun -m kloc_lens``): the ``kloc-lens`` command line."""

from kloc_lens.cli import main

raise SystemExit(main())
