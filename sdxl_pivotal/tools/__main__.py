"""`python -m sdxl_pivotal.tools <subcommand> ...`"""

from .cli import main

raise SystemExit(main())
