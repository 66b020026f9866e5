"""Methods text ("boilerplate") of one BIDS-App call, with its references.

As fMRIPrep does, every ``dkiharm`` run writes ``output_dir/logs/CITATION.{md,html,tex,bib}``:
the methods text of the workflow the run built, citing the method and every tool involved.
``--boilerplate-only`` writes them and stops. The text itself lives next to the code it
describes: each ``init_*_wf`` factory sets ``__desc__`` with the values it was built with
(:mod:`dkiharm_nipype.workflows.literate`); this module only visits the built graph, adds
the references and renders Markdown, HTML, LaTeX and BibTeX.

The text holds pandoc-style citation markers (``[@key; @key2]``), rendered into each
format here, so no converter (pandoc) is needed.

Example
-------
>>> from pathlib import Path
>>> from dkiharm_nipype.config import RunConfig
>>> config = RunConfig(bids_dir=Path("bids"), output_dir=Path("out"),
...                    analysis_level="participant", work_dir=Path("work"),
...                    preproc="mrtrix", fit_method="wls", b_max=2000.0)
>>> paragraphs = methods_paragraphs(config)
>>> "weighted linear least squares" in paragraphs[2]
True
>>> sorted(cited_keys(paragraphs))[:3]
['dipy', 'glenn2015', 'gorgolewski2011']
>>> "Veraart et al., 2016" in render_markdown(paragraphs)
True
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig

__all__ = [
    "REFERENCES",
    "Reference",
    "cited_keys",
    "methods_paragraphs",
    "render_bibtex",
    "render_html",
    "render_latex",
    "render_markdown",
    "write_citation",
]

CITATION_FILES = ("CITATION.md", "CITATION.html", "CITATION.tex", "CITATION.bib")
_CITE = re.compile(r"\[(@[\w-]+(?:;\s*@[\w-]+)*)\]")


@dataclass(frozen=True)
class Reference:
    """One bibliography entry: a BibTeX type and its fields (``author`` as BibTeX writes it)."""

    kind: str
    fields: dict[str, str]

    @property
    def surnames(self) -> list[str]:
        names = [a.strip() for a in self.fields["author"].split(" and ")]
        return [n.split(",")[0].strip("{} ") for n in names]

    def short(self) -> str:
        """``Tong et al., 2020``; ``Andersson and Sotiropoulos, 2016``."""
        names = self.surnames
        if names[-1] == "others" or len(names) > 2:
            who = f"{names[0]} et al."
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = names[0]
        return f"{who}, {self.fields['year']}"

    def long(self) -> str:
        """One line of the reference list (plain text)."""
        f = self.fields
        names = self.surnames
        authors = ", ".join(n for n in names if n != "others")
        if names[-1] == "others":
            authors += " et al."
        venue = f.get("journal") or f.get("booktitle") or f.get("publisher") or ""
        venue = venue or f.get("institution", "") or f.get("howpublished", "")
        parts = [f"{authors} ({f['year']}). {f['title']}."]
        if venue:
            where = venue
            if f.get("volume"):
                where += f" {f['volume']}"
            if f.get("pages"):
                where += f":{f['pages'].replace('--', '-')}"
            parts.append(f"{where}.")
        if f.get("doi"):
            parts.append(f"doi:{f['doi']}")
        elif f.get("url"):
            parts.append(f["url"])
        return " ".join(parts)


def _article(author, title, journal, year, volume, pages, doi) -> Reference:
    return Reference(
        "article",
        {
            "author": author,
            "title": title,
            "journal": journal,
            "year": year,
            "volume": volume,
            "pages": pages,
            "doi": doi,
        },
    )


#: Everything the methods text may cite, by BibTeX key.
REFERENCES: dict[str, Reference] = {
    "tong2020": _article(
        "Tong, Qiqi and Gong, Ting and He, Hongjian and Wang, Zheng and Yu, Wenwen and "
        "Zhang, Jianjun and Zhai, Lihao and Cui, Hongsheng and Meng, Xin and Tax, Chantal "
        "W. M. and Zhong, Jianhui",
        "A deep learning-based method for improving reliability of multicenter diffusion "
        "kurtosis imaging with varied acquisition protocols",
        "Magnetic Resonance Imaging",
        "2020",
        "73",
        "31--44",
        "10.1016/j.mri.2020.08.001",
    ),
    "li2019": _article(
        "Li, Zhenghao and Gong, Ting and Lin, Zhichao and He, Hongjian and Tong, Qiqi and "
        "Li, Chen and Sun, Yi and Yu, Feng and Zhong, Jianhui",
        "Fast and robust diffusion kurtosis parametric mapping using a three-dimensional "
        "convolutional neural network",
        "IEEE Access",
        "2019",
        "7",
        "71398--71411",
        "10.1109/ACCESS.2019.2919241",
    ),
    "gorgolewski2011": _article(
        "Gorgolewski, Krzysztof and Burns, Christopher D. and Madison, Cindee and Clark, "
        "Dav and Halchenko, Yaroslav O. and Waskom, Michael L. and Ghosh, Satrajit S.",
        "Nipype: a flexible, lightweight and extensible neuroimaging data processing "
        "framework in Python",
        "Frontiers in Neuroinformatics",
        "2011",
        "5",
        "13",
        "10.3389/fninf.2011.00013",
    ),
    "nipypesoftware": Reference(
        "misc",
        {
            "author": "Esteban, Oscar and Markiewicz, Christopher J. and Burns, Christopher "
            "and Goncalves, Mathias and Jarecka, Dorota and Ziegler, Erik and others",
            "title": "nipy/nipype: Neuroimaging in Python pipelines and interfaces",
            "howpublished": "Zenodo (software)",
            "year": "2024",
            "doi": "10.5281/zenodo.596855",
        },
    ),
    "dipy": _article(
        "Garyfallidis, Eleftherios and Brett, Matthew and Amirbekian, Bagrat and Rokem, "
        "Ariel and van der Walt, Stefan and Descoteaux, Maxime and Nimmo-Smith, Ian",
        "Dipy, a library for the analysis of diffusion MRI data",
        "Frontiers in Neuroinformatics",
        "2014",
        "8",
        "8",
        "10.3389/fninf.2014.00008",
    ),
    "tournier2019": _article(
        "Tournier, J.-Donald and Smith, Robert and Raffelt, David and Tabbara, Rami and "
        "Dhollander, Thijs and Pietsch, Maximilian and Christiaens, Daan and Jeurissen, Ben "
        "and Yeh, Chun-Hung and Connelly, Alan",
        "MRtrix3: A fast, flexible and open software framework for medical image processing "
        "and visualisation",
        "NeuroImage",
        "2019",
        "202",
        "116137",
        "10.1016/j.neuroimage.2019.116137",
    ),
    "veraart2016": _article(
        "Veraart, Jelle and Novikov, Dmitry S. and Christiaens, Daan and Ades-Aron, Benjamin "
        "and Sijbers, Jan and Fieremans, Els",
        "Denoising of diffusion MRI using random matrix theory",
        "NeuroImage",
        "2016",
        "142",
        "394--406",
        "10.1016/j.neuroimage.2016.08.016",
    ),
    "kellner2016": _article(
        "Kellner, Elias and Dhital, Bibek and Kiselev, Valerij G. and Reisert, Marco",
        "Gibbs-ringing artifact removal based on local subvoxel-shifts",
        "Magnetic Resonance in Medicine",
        "2016",
        "76",
        "1574--1581",
        "10.1002/mrm.26054",
    ),
    "andersson2003": _article(
        "Andersson, Jesper L. R. and Skare, Stefan and Ashburner, John",
        "How to correct susceptibility distortions in spin-echo echo-planar images: "
        "application to diffusion tensor imaging",
        "NeuroImage",
        "2003",
        "20",
        "870--888",
        "10.1016/S1053-8119(03)00336-7",
    ),
    "andersson2016": _article(
        "Andersson, Jesper L. R. and Sotiropoulos, Stamatios N.",
        "An integrated approach to correction for off-resonance effects and subject movement "
        "in diffusion MR imaging",
        "NeuroImage",
        "2016",
        "125",
        "1063--1078",
        "10.1016/j.neuroimage.2015.10.019",
    ),
    "jenkinson2012": _article(
        "Jenkinson, Mark and Beckmann, Christian F. and Behrens, Timothy E. J. and Woolrich, "
        "Mark W. and Smith, Stephen M.",
        "FSL",
        "NeuroImage",
        "2012",
        "62",
        "782--790",
        "10.1016/j.neuroimage.2011.09.015",
    ),
    "andersson2007": Reference(
        "techreport",
        {
            "author": "Andersson, Jesper L. R. and Jenkinson, Mark and Smith, Stephen",
            "title": "Non-linear registration, aka spatial normalisation",
            "institution": "FMRIB Centre, University of Oxford",
            "number": "TR07JA2",
            "year": "2007",
        },
    ),
    "avants2008": _article(
        "Avants, Brian B. and Epstein, Charles L. and Grossman, Murray and Gee, James C.",
        "Symmetric diffeomorphic image registration with cross-correlation: evaluating "
        "automated labeling of elderly and neurodegenerative brain",
        "Medical Image Analysis",
        "2008",
        "12",
        "26--41",
        "10.1016/j.media.2007.06.004",
    ),
    "raffelt2011": _article(
        "Raffelt, David and Tournier, J.-Donald and Fripp, Jurgen and Crozier, Stuart and "
        "Connelly, Alan and Salvado, Olivier",
        "Symmetric diffeomorphic registration of fibre orientation distributions",
        "NeuroImage",
        "2011",
        "56",
        "1171--1180",
        "10.1016/j.neuroimage.2011.02.014",
    ),
    "avants2011": _article(
        "Avants, Brian B. and Tustison, Nicholas J. and Song, Gang and Cook, Philip A. and "
        "Klein, Arno and Gee, James C.",
        "A reproducible evaluation of ANTs similarity metric performance in brain image "
        "registration",
        "NeuroImage",
        "2011",
        "54",
        "2033--2044",
        "10.1016/j.neuroimage.2010.09.025",
    ),
    "jensen2005": _article(
        "Jensen, Jens H. and Helpern, Joseph A. and Ramani, Anita and Lu, Hanzhang and "
        "Kaczynski, Kyle",
        "Diffusional kurtosis imaging: the quantification of non-gaussian water diffusion by "
        "means of magnetic resonance imaging",
        "Magnetic Resonance in Medicine",
        "2005",
        "53",
        "1432--1440",
        "10.1002/mrm.20508",
    ),
    "tabesh2011": _article(
        "Tabesh, Ali and Jensen, Jens H. and Ardekani, Babak A. and Helpern, Joseph A.",
        "Estimation of tensors and tensor-derived measures in diffusional kurtosis imaging",
        "Magnetic Resonance in Medicine",
        "2011",
        "65",
        "823--836",
        "10.1002/mrm.22655",
    ),
    "glenn2015": _article(
        "Glenn, G. Russell and Helpern, Joseph A. and Tabesh, Ali and Jensen, Jens H.",
        "Quantitative assessment of diffusional kurtosis anisotropy",
        "NMR in Biomedicine",
        "2015",
        "28",
        "448--459",
        "10.1002/nbm.3271",
    ),
    "collier2015": _article(
        "Collier, Quinten and Veraart, Jelle and Jeurissen, Ben and den Dekker, Arnold J. and "
        "Sijbers, Jan",
        "Iterative reweighted linear least squares for accurate, fast, and robust estimation "
        "of diffusion magnetic resonance parameters",
        "Magnetic Resonance in Medicine",
        "2015",
        "73",
        "2174--2184",
        "10.1002/mrm.25351",
    ),
    "veraart2013": _article(
        "Veraart, Jelle and Sijbers, Jan and Sunaert, Stefan and Leemans, Alexander and "
        "Jeurissen, Ben",
        "Weighted linear least squares estimation of diffusion MRI parameters: strengths, "
        "limitations, and pitfalls",
        "NeuroImage",
        "2013",
        "81",
        "335--346",
        "10.1016/j.neuroimage.2013.05.028",
    ),
    "paszke2019": Reference(
        "inproceedings",
        {
            "author": "Paszke, Adam and Gross, Sam and Massa, Francisco and Lerer, Adam and "
            "Bradbury, James and Chanan, Gregory and others",
            "title": "PyTorch: An imperative style, high-performance deep learning library",
            "booktitle": "Advances in Neural Information Processing Systems 32",
            "year": "2019",
            "pages": "8024--8035",
        },
    ),
    "gal2016": Reference(
        "inproceedings",
        {
            "author": "Gal, Yarin and Ghahramani, Zoubin",
            "title": "Dropout as a Bayesian approximation: representing model uncertainty in "
            "deep learning",
            "booktitle": "Proceedings of the 33rd International Conference on Machine Learning",
            "year": "2016",
            "pages": "1050--1059",
        },
    ),
    "lehtinen2018": Reference(
        "inproceedings",
        {
            "author": "Lehtinen, Jaakko and Munkberg, Jacob and Hasselgren, Jon and Laine, "
            "Samuli and Karras, Tero and Aittala, Miika and Aila, Timo",
            "title": "Noise2Noise: learning image restoration without clean data",
            "booktitle": "Proceedings of the 35th International Conference on Machine Learning",
            "year": "2018",
            "pages": "2965--2974",
        },
    ),
    "fortin2017": _article(
        "Fortin, Jean-Philippe and Parker, Drew and Tunc, Birkan and Watanabe, Takanori and "
        "Elliott, Mark A. and Ruparel, Kosha and others",
        "Harmonization of multi-site diffusion tensor imaging data",
        "NeuroImage",
        "2017",
        "161",
        "149--170",
        "10.1016/j.neuroimage.2017.08.047",
    ),
    "fortin2018": _article(
        "Fortin, Jean-Philippe and Cullen, Nicholas and Sheline, Yvette I. and Taylor, "
        "Warren D. and Aselcioglu, Irem and others",
        "Harmonization of cortical thickness measurements across scanners and sites",
        "NeuroImage",
        "2018",
        "167",
        "104--120",
        "10.1016/j.neuroimage.2017.11.024",
    ),
    "pomponio2020": _article(
        "Pomponio, Raymond and Erus, Guray and Habes, Mohamad and Doshi, Jimit and "
        "Srinivasan, Dhivya and others",
        "Harmonization of large MRI datasets for the analysis of brain imaging patterns "
        "throughout the lifespan",
        "NeuroImage",
        "2020",
        "208",
        "116450",
        "10.1016/j.neuroimage.2019.116450",
    ),
    "mirzaalian2016": _article(
        "Mirzaalian, Hengameh and Ning, Lipeng and Savadjiev, Peter and Pasternak, Ofer and "
        "Bouix, Sylvain and others",
        "Inter-site and inter-scanner diffusion MRI data harmonization",
        "NeuroImage",
        "2016",
        "135",
        "311--323",
        "10.1016/j.neuroimage.2016.04.041",
    ),
}

#: The closing paragraph of every methods text.
CC0_PARAGRAPH = (
    "The above methods text was generated automatically by dkiharm from the options of "
    "the run, with the intention that users copy and paste it into their manuscripts "
    "unchanged; it is released under the CC0 license."
)


def methods_paragraphs(
    config: RunConfig | None = None, *, scans: Sequence | None = None, workflow=None
) -> list[str]:
    """The methods text of a run as paragraphs with ``[@key]`` citation markers.

    The text is the visit of the built workflow: every factory describes what it was built
    to do (``__desc__``, :class:`~dkiharm_nipype.workflows.literate.LiterateWorkflow`);
    nothing here knows the pipeline's steps.

    Parameters
    ----------
    config : RunConfig
        The options of the run, used to build the workflow when ``workflow`` is not given
        (:func:`dkiharm_nipype.workflows.base.init_description_wf`).
    scans : list of DWIScan, optional
        The selected scans: the real graph is built (their counts, the runs TOPUP corrects
        and the training subjects drawn with the seed are then in the text).
    workflow : LiterateWorkflow, optional
        An already built workflow (the CLI passes the one it runs).
    """
    from ..workflows.literate import paragraphs

    if workflow is None:
        from ..workflows.base import init_description_wf

        workflow = init_description_wf(config=config, scans=scans)
    return [*paragraphs(workflow.visit_desc()), CC0_PARAGRAPH]


def cited_keys(paragraphs: Sequence[str]) -> list[str]:
    """Citation keys in order of first appearance (each once)."""
    keys: list[str] = []
    for para in paragraphs:
        for key in re.findall(r"@([\w-]+)", para):
            if key in REFERENCES and key not in keys:
                keys.append(key)
    return keys


def _sub_citations(text: str, group, single) -> str:
    """Replace ``[@a; @b]`` with ``group([a, b])`` and a bare ``@a`` with ``single(a)``."""
    text = _CITE.sub(lambda m: group(re.findall(r"@([\w-]+)", m.group(1))), text)
    return re.sub(
        r"(?<![\w\\{])@([\w-]+)",
        lambda m: single(m.group(1)) if m.group(1) in REFERENCES else m.group(0),
        text,
    )


def _in_text(key: str) -> str:
    ref = REFERENCES[key]
    who, year = ref.short().rsplit(", ", 1)
    return f"{who} ({year})"


def _by_author(keys: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: REFERENCES[k].long().lower())


def render_markdown(paragraphs: Sequence[str]) -> str:
    """Markdown: author-year citations and a reference list."""
    body = [
        _sub_citations(
            p,
            lambda ks: "(" + "; ".join(REFERENCES[k].short() for k in ks) + ")",
            _in_text,
        )
        for p in paragraphs
    ]
    refs = [f"- {REFERENCES[k].long()}" for k in _by_author(cited_keys(paragraphs))]
    return "\n\n".join(["# Methods", *body, "## References", "\n".join(refs)]) + "\n"


def render_html(paragraphs: Sequence[str]) -> str:
    """A standalone HTML page with linked citations."""

    def group(keys):
        links = [f'<a href="#{k}">{html.escape(REFERENCES[k].short())}</a>' for k in keys]
        return "(" + "; ".join(links) + ")"

    def single(key):
        return f'<a href="#{key}">{html.escape(_in_text(key))}</a>'

    body = [
        f"<p>{_sub_citations(html.escape(p, quote=False), group, single)}</p>" for p in paragraphs
    ]
    refs = [
        f'<li id="{k}">{html.escape(REFERENCES[k].long())}</li>'
        for k in _by_author(cited_keys(paragraphs))
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head><meta charset="utf-8"><title>dkiharm methods</title></head>',
            "<body>",
            "<h1>Methods</h1>",
            *body,
            "<h2>References</h2>",
            "<ul>",
            *refs,
            "</ul>",
            "</body>",
            "</html>",
            "",
        ]
    )


_TEX_ESCAPES = [
    ("\\", r"\textbackslash{}"),
    ("&", r"\&"),
    ("%", r"\%"),
    ("#", r"\#"),
    ("_", r"\_"),
    ("~", r"\textasciitilde{}"),
    ("^", r"\textasciicircum{}"),
    ("≤", r"$\leq$"),
    ("²", r"$^2$"),
    ("×", r"$\times$"),
    ("–", "--"),
]


def _tex_escape(text: str) -> str:
    for char, repl in _TEX_ESCAPES:
        text = text.replace(char, repl)
    return text


def render_latex(paragraphs: Sequence[str], *, bib_name: str = "CITATION") -> str:
    """A LaTeX fragment with natbib ``\\citep``/``\\citet`` commands and its bibliography."""
    body = [
        _sub_citations(
            _tex_escape(p),
            lambda ks: r"\citep{" + ",".join(ks) + "}",
            lambda k: r"\citet{" + k + "}",
        )
        for p in paragraphs
    ]
    return (
        "\n\n".join(
            [
                "% Methods text generated by dkiharm; needs \\usepackage{natbib}",
                *body,
                "\\bibliographystyle{plainnat}\n\\bibliography{" + bib_name + "}",
            ]
        )
        + "\n"
    )


def render_bibtex(keys: Sequence[str]) -> str:
    """BibTeX entries of ``keys`` (sorted)."""
    entries = []
    for key in sorted(keys):
        ref = REFERENCES[key]
        fields = ",\n".join(f"  {name} = {{{value}}}" for name, value in ref.fields.items())
        entries.append(f"@{ref.kind}{{{key},\n{fields}\n}}")
    return "\n\n".join(entries) + "\n"


def write_citation(
    config: RunConfig | None, logs_dir: Path, *, scans: Sequence | None = None, workflow=None
) -> dict[str, Path]:
    """Write ``CITATION.{md,html,tex,bib}`` into ``logs_dir`` (each file atomically).

    The text is that of ``workflow`` when given, else of the workflow ``config`` and
    ``scans`` build (:func:`methods_paragraphs`). Returns the written paths by extension
    (``md``, ``html``, ``tex``, ``bib``).
    """
    from ..utils.io import atomic_write_text

    paragraphs = methods_paragraphs(config, scans=scans, workflow=workflow)
    texts = {
        "md": render_markdown(paragraphs),
        "html": render_html(paragraphs),
        "tex": render_latex(paragraphs),
        "bib": render_bibtex(cited_keys(paragraphs)),
    }
    written = {}
    for ext, text in texts.items():
        path = Path(logs_dir) / f"CITATION.{ext}"
        atomic_write_text(text, path)
        written[ext] = path
    return written
