"""``python -m course_lib.experiments NAME``: make one of the recorded runs (see the package's docstring)."""

import sys

from course_lib.experiments import main

sys.exit(main())
