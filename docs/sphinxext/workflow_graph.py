"""``.. workflow::``: draw a Nipype workflow built by the directive's code (inline SVG).

The directive's content is Python that defines ``wf``; the graph is rendered with Graphviz
``dot`` at build time and embedded in the HTML page, as niworkflows' directive of the same
name does for fMRIPrep, without its dependencies.

Options: ``:graph2use:`` (``orig``, ``colored``, ``hierarchical``, ``flat``; default
``orig``) and ``:simple_form:`` (``yes``/``no``; default ``yes``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


class WorkflowDirective(SphinxDirective):
    has_content = True
    option_spec = {"graph2use": directives.unchanged, "simple_form": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        namespace: dict = {}
        try:
            exec("\n".join(self.content), namespace)  # noqa: S102 - our own docstrings
            workflow = namespace["wf"]
            with tempfile.TemporaryDirectory() as tmp:
                svg = workflow.write_graph(
                    dotfilename=str(Path(tmp) / "graph.dot"),
                    graph2use=self.options.get("graph2use", "orig"),
                    format="svg",
                    simple_form=self.options.get("simple_form", "yes") in ("yes", "true"),
                )
                text = Path(svg).read_text()
        except Exception as exc:  # a broken example must fail the -W build, with the cause
            raise self.error(f"workflow graph could not be drawn: {exc!r}") from exc
        text = text[text.index("<svg") :]
        return [nodes.raw("", f'<div class="workflow-graph">{text}</div>', format="html")]


def setup(app):
    app.add_directive("workflow", WorkflowDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
