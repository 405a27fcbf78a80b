"""python -m planner.validation: the real-system check (planner/validation/validate.py)."""

import sys

from planner.validation.validate import main

sys.exit(main())
