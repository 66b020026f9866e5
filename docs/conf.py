"""Sphinx configuration of the dkiharm documentation (``sphinx-build -W -b html docs out``)."""

import os
import sys
from pathlib import Path

from nipype import config as ncfg
from nipype import logging as nlogging

from dkiharm_nipype import __version__

sys.path.insert(0, str(Path(__file__).parent / "sphinxext"))
os.environ.setdefault("MRTRIX_QUIET", "1")
# building the workflow graphs logs through nipype at INFO: keep the build output short
ncfg.set("logging", "workflow_level", "WARNING")
ncfg.set("execution", "check_version", "false")
nlogging.update_logging(ncfg)

project = "dkiharm"
author = "dkiharm developers"
release = version = __version__
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "workflow_graph",
    "automodules",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "sphinxext"]
html_theme = "alabaster"
html_static_path = ["_static"]

# API pages: numpy-style docstrings with the nipreps sections of workflow factories
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_custom_sections = [
    ("Inputs", "params_style"),
    ("Outputs", "params_style"),
    ("Shapes", "notes_style"),
]
# no network at build time: no intersphinx; nitpicky off (type names of third-party APIs)
nitpicky = False
