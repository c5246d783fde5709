"""``python -m aft_vit`` is the ``aft-vit`` command."""
import sys

from aft_vit.cli import main

sys.exit(main())
