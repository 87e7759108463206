"""``python -m captioning.evaluation RESULTS.json --annotations ANNOTATIONS.json``: see ``cli.py``."""

import sys

from captioning.evaluation.cli import main

sys.exit(main())
