"""``python -m serve.cli ...`` runs the ``stc-serve`` command."""
import sys

from serve.cli.main import main

sys.exit(main())
