"""``python -m bench``: the benchmark CLI (bench/run.py); ``python -m bench report`` the report."""

from .run import main

raise SystemExit(main())
