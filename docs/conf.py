"""Sphinx configuration of panther's documentation site (``make docs``).

Builds offline (no intersphinx), with the default theme; the API reference is generated from the
docstrings by autodoc, so the package (and its native op library ``panther._C``) must be importable:
``make docs`` builds it first.
"""
import os
import sys

# The repository root first on the path: the docs describe this checkout, not an installed copy.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import panther  # noqa: E402  (after the path tweak)

project = "panther"
author = "the panther developers"
copyright = "the panther developers"
release = version = panther.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# autodoc: members in the order of the source, each module's __all__ decides what is public.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_class_signature = "mixed"
autoclass_content = "class"
# nn.Module's generic docstrings (extra_repr, ...) say nothing about panther's layers.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = ["Shape"]

# Markdown how-tos: anchors for headings down to level 3, so pages can link "page.md#section".
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"panther {release}"
html_theme_options = {
    "description": "Sketched layers for PyTorch and a torch.compile backend",
    "fixed_sidebar": True,
}
