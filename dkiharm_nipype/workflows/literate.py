"""A workflow that carries the methods text of the steps it builds (niworkflows' pattern).

Each ``init_*_wf`` factory sets ``workflow.__desc__`` (and, rarely, ``__postdesc__``) from
the values it was built with; :meth:`LiterateWorkflow.visit_desc` walks the built graph in
execution order and joins the texts, dropping a text already given by an identical sibling
(the twelve scans' preprocessing is described once). A text that starts with a blank line
opens a paragraph; otherwise it continues the previous one. The methods boilerplate
(:mod:`dkiharm_nipype.cli.boilerplate`) only renders what this visit returns.

``__fold__`` names what a workflow is built once per (``"scan"``, ``"scanner"``,
``"training scan"``): the methods figure (:mod:`dkiharm_nipype.cli.graphs`) draws one of them
and labels it with the count.

>>> from nipype.pipeline import engine as pe
>>> parent, child = LiterateWorkflow(name="parent"), LiterateWorkflow(name="child")
>>> parent.__desc__, child.__desc__ = "\\n\\nFirst step.", " Second step."
>>> parent.add_nodes([child])
>>> parent.visit_desc()
'\\n\\nFirst step. Second step.'
"""

from __future__ import annotations

import networkx as nx
from nipype.pipeline import engine as pe


class LiterateWorkflow(pe.Workflow):
    """A Nipype workflow with a methods description (``__desc__``, ``__postdesc__``)."""

    def __init__(self, name: str, base_dir: str | None = None) -> None:
        super().__init__(name, base_dir)
        self.__desc__: str | None = None
        self.__postdesc__: str | None = None
        self.__fold__: str | None = None

    def ordered_nodes(self) -> list:
        """Nodes in execution order; ties broken by the order they were added."""
        order = {node: i for i, node in enumerate(self._graph.nodes)}
        return list(nx.lexicographical_topological_sort(self._graph, key=order.__getitem__))

    def visit_desc(self) -> str:
        """This workflow's text, then its sub-workflows' (deduplicated), then ``__postdesc__``."""
        parts = [self.__desc__] if self.__desc__ else []
        for node in self.ordered_nodes():
            if isinstance(node, LiterateWorkflow):
                text = node.visit_desc()
                if text and text not in parts:
                    parts.append(text)
        if self.__postdesc__:
            parts.append(self.__postdesc__)
        return "".join(parts)


def paragraphs(text: str) -> list[str]:
    """Split a visited description into paragraphs (blank-line separated)."""
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
