"""Imported by the forkserver that MultiProc's workers are forked from (see ``run.py``).

Workers inherit this logging setup: the console's single-line record format instead of
Nipype's two-line one, and, once the run has a log file, a copy of their records in it.
"""

from __future__ import annotations

import logging
import os
import sys

from .run import DATE_FORMAT, LOG_FORMAT

logging.basicConfig(format=LOG_FORMAT, datefmt=DATE_FORMAT, stream=sys.stdout, force=True)
if os.environ.get("DKIHARM_LOG_FILE"):
    _handler = logging.FileHandler(os.environ["DKIHARM_LOG_FILE"])
    _handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d " + DATE_FORMAT))
    logging.getLogger().addHandler(_handler)
