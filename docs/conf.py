"""Sphinx configuration of the dkiharm documentation."""

from dkiharm_nipype import __version__

project = "dkiharm"
author = "dkiharm developers"
release = version = __version__
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_mock_imports = []
napoleon_numpy_docstring = True
