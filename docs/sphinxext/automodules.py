"""``.. automodules:: package``: one ``automodule`` section per submodule found at build time.

New modules (e.g. more interfaces) appear in the API pages without editing them.
"""

from __future__ import annotations

import importlib
import pkgutil

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class AutoModules(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        package = importlib.import_module(self.arguments[0])
        names = sorted(
            info.name
            for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")
            if not info.name.rsplit(".", 1)[1].startswith("_")
        )
        lines = []
        for name in names:
            lines += [name, "-" * len(name), "", f".. automodule:: {name}", ""]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(
            self.state, StringList(lines, source=self.get_source_info()[0]), container
        )
        return container.children


def setup(app):
    app.add_directive("automodules", AutoModules)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
