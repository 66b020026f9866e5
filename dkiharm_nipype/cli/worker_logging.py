"""Imported by the forkserver that MultiProc's workers are forked from (see ``run.py``).

Workers inherit this logging setup: the console's single-line record format instead of
Nipype's two-line one, without Nipype's crash tracebacks (the run reports each failure
once), and, once the run has a log file, a copy of their records in it.
"""

from __future__ import annotations

import os

from .monitor import use_one_format

use_one_format(os.environ.get("DKIHARM_LOG_FILE"))
