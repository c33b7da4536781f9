"""Imported by the fork server alone, first of what it preloads (``launch/forked_workers.py``).

Until a worker forked from the server runs ``launch.worker.forked``, what Python prints on stderr goes nowhere:
a worker forked while its launcher is being stopped (a cancelled job) fails to start, and multiprocessing's
traceback would follow the launcher's one line. ``forked`` gives the worker its stderr back first thing; what the
C++ side writes to file descriptor 2 is never held back.
"""

from __future__ import annotations

import os
import sys

sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the server's, for as long as it lives
