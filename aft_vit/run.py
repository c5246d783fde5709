"""``python -m aft_vit.run SCRIPT [ARGS...]``: run any timm script (validate.py, benchmark.py, inference.py, ...)
with the aft models registered, as if it were started with ``python SCRIPT ARGS...``.

timm's train.py can import us itself (``--device-modules aft_vit``); its other scripts have no such
hook, so this registers the models and then runs the script as ``__main__`` with runpy.
"""
import os
import runpy
import sys
from typing import List, Optional

import aft_vit  # noqa: F401  registers the aft models


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f'python -m aft_vit.run: error: script {script} does not exist', file=sys.stderr)
        return 2
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` would
    runpy.run_path(script, run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())
