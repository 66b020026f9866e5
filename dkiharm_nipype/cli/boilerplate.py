"""Methods text ("boilerplate") of one BIDS-App call, with its references.

As fMRIPrep does, every ``dkiharm`` run writes ``output_dir/logs/CITATION.{md,html,tex,bib}``:
a methods paragraph generated from the options the run actually used (the preprocessing
steps that really run, the fit, the registration engine, the network and its training),
citing the method and every tool involved. ``--boilerplate-only`` writes them and stops.

The text is kept as paragraphs holding pandoc-style citation markers (``[@key; @key2]``)
and rendered into each format here, so no converter (pandoc) is needed.

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
import importlib.metadata
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import RunConfig
from ..preproc.modes import resolved_preproc_mode

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

_FIT_TEXT = {
    "irlls": "iteratively reweighted linear least squares (IRLLS) with outlier rejection "
    "[@collier2015], the robust estimator the method uses for its labels [@tong2020]",
    "wls": "weighted linear least squares [@veraart2013]",
    "ols": "ordinary linear least squares",
}
_ENGINE_TEXT = {
    "fnirt": "FSL FLIRT (12 degrees of freedom) followed by FNIRT [@andersson2007; "
    "@jenkinson2012], as in the original method",
    "dipy-syn": "an affine registration followed by symmetric normalization (SyN) with a "
    "local cross-correlation metric [@avants2008] as implemented in dipy [@dipy]",
    "mrtrix": "MRtrix3 mrregister (rigid, affine then symmetric diffeomorphic "
    "non-linear registration) [@raffelt2011; @tournier2019]",
    "ants": "ANTs SyN [@avants2011]",
}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _mrtrix_version() -> str:
    exe = shutil.which("dwidenoise")
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    found = re.search(r"==\s*\S+\s+([\w.\-]+)\s*==", out.stdout)
    return found.group(1) if found else ""


def _fsl_version() -> str:
    path = Path(os.environ.get("FSLDIR", "/nonexistent")) / "etc" / "fslversion"
    try:
        return path.read_text().split(":")[0].strip()
    except OSError:
        return ""


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _data_sentence(config: RunConfig, scans: Sequence) -> str:
    subjects = {s.subject for s in scans}
    scanners = {s.scanner for s in scans}
    entity = {"ses": "session label", "session": "session label", "acq": "acquisition label"}
    how = entity.get(config.scanner_entity, f"sidecar field {config.scanner_entity}")
    return (
        f"In total, {_count(len(scans), 'diffusion-weighted (DWI) run')} of "
        f"{_count(len(subjects), 'participant')} acquired on {_count(len(scanners), 'scanner')} "
        f"(scanners identified by the {how}) were processed; repeated runs were kept as "
        "separate scans."
    )


def _preproc_paragraph(config: RunConfig, preproc: str, scans: Sequence | None) -> str:
    if preproc == "none":
        text = "The DWI series were used as provided, without denoising or artefact correction."
    else:
        mrtrix = _mrtrix_version()
        mrtrix = f"MRtrix3{' ' + mrtrix if mrtrix else ''} [@tournier2019]"
        if config.denoiser == "mppca":
            from ..interfaces.preproc import MPPCADenoise

            how, source = (
                "by Marchenko-Pastur principal component analysis of the raw magnitude data "
                "[@veraart2016] (dkiharm's implementation: 5x5x5-voxel windows every "
                f"{MPPCADenoise().inputs.stride} voxels, overlapping reconstructions averaged)",
                "from",
            )
        else:
            how, source = (
                "with dwidenoise, a Marchenko-Pastur principal component analysis of the raw "
                "magnitude data [@veraart2016]",
                "both from",
            )
        text = (
            f"Each DWI series was first denoised {how}, then Gibbs ringing was removed with "
            f"mrdegibbs, by local sub-voxel shifts [@kellner2016], {source} {mrtrix}."
        )
        if preproc == "fsl":
            fsl = _fsl_version()
            topup = "for the runs with reversed phase-encoding b=0 images"
            if scans is not None:
                from ..utils.fsl import has_reversed_pe

                n_rpe = sum(has_reversed_pe(s.metadata, s.fmap_metadata) for s in scans)
                topup = (
                    f"for the {n_rpe} of {len(scans)} runs with reversed phase-encoding b=0 images"
                )
            text += (
                " Susceptibility-induced distortions were estimated with TOPUP "
                f"[@andersson2003] {topup}, and head motion and eddy-current distortions were "
                "corrected, with replacement of outlier slices, by Eddy [@andersson2016] "
                f"(FSL{' ' + fsl if fsl else ''} [@jenkinson2012]), which resamples every "
                "volume once and rotates the b-vectors."
            )
    if config.mask_method == "dwi2mask":
        text += " A brain mask was estimated on the preprocessed series with MRtrix3 dwi2mask."
    else:
        text += (
            " A brain mask was estimated on the mean b=0 image with dipy's median_otsu [@dipy]."
        )
    return text


def _fit_paragraph(config: RunConfig) -> str:
    from ..dki.provenance import constraints_sentence, fit_options

    # the same values as the map sidecars (one source of truth: dki/provenance.py)
    constraints = constraints_sentence(fit_options(method=config.fit_method, constraints=True))
    shells = (
        f"volumes with b ≤ {config.b_max:g} s/mm²" if config.b_max is not None else "all volumes"
    )
    return (
        "The diffusion and kurtosis tensors of the DKI signal model [@jensen2005] were "
        f"estimated voxelwise from {shells} by {_FIT_TEXT[config.fit_method]}, followed by a "
        f"projection onto physically plausible values ({constraints}). Mean, axial and radial "
        "diffusivity (MD, AD, RD), fractional anisotropy (FA), and mean, axial and radial "
        "kurtosis (MK, AK, RK) [@tabesh2011] and the kurtosis fractional anisotropy (KFA) "
        "[@glenn2015] were computed with the "
        "definitions of dipy [@dipy]. The SNR of each scan was measured as the mean b=0 signal "
        "in white matter divided by the noise standard deviation there (dwidenoise's "
        "noise map, or the spread across b=0 frames without denoising), in decibels."
    )


def _train_defaults() -> dict:
    """The training settings the group workflow leaves at TrainHarmonizer's defaults."""
    from ..interfaces.harmonize import TrainHarmonizer

    inputs = TrainHarmonizer().inputs
    names = (
        "hidden_channels",
        "dropout",
        "learning_rate",
        "patience",
        "val_fraction",
        "loss",
        "target_scaling",
    )
    return {name: getattr(inputs, name) for name in names}


def _network_sentence(config: RunConfig) -> str:
    d = _train_defaults()
    k = config.kernel_size
    conv = f"a {k}×{k}×{k} convolution" + (" (the published network's is 3×3×3)" if k != 3 else "")
    return (
        "a three-dimensional hierarchical convolutional neural network [@li2019; @tong2020] "
        f"({conv} followed by 1×1×1 layers of {d['hidden_channels']} channels "
        f"with ReLU activations and {d['dropout'] * 100:g} % dropout before the outputs; a "
        "shallow head predicting MD, AD and RD and a head one layer deeper predicting FA, MK, "
        "AK, RK and KFA)"
    )


def _fit_input_clause(config: RunConfig) -> str:
    if config.network_input != "dwi+fit":
        return ""
    return (
        ", together with the scan's own IRLLS maps (z-scored like the targets), which the "
        "network output plus a learned correction (a residual connection; an extension of "
        "the published network)"
    )


def _training_sentence(config: RunConfig) -> str:
    d = _train_defaults()
    loss = {"mse": "mean squared error", "l1": "mean absolute error"}[d["loss"]]
    scaling = "z-scored maps" if d["target_scaling"] == "zscore" else "maps in their units"
    device = "CPU" if config.device == "cpu" else f"GPU ({config.device})"
    return (
        f"Networks were trained in PyTorch {_version('torch')} [@paszke2019] on the {device} "
        f"with Adam (learning rate {d['learning_rate']:g}), a {loss} loss on {scaling}, "
        f"{config.samples_per_epoch:,} training voxels per epoch and at most {config.epochs} "
        f"epochs, with early stopping on the {d['val_fraction'] * 100:g} % of voxel blocks "
        f"held out for validation (patience {d['patience']} epochs) and seed {config.seed}."
    )


def _mc_sentence(config: RunConfig) -> str:
    if not config.mc_samples:
        return ""
    return (
        f" Voxelwise uncertainty was estimated as the standard deviation over "
        f"{config.mc_samples} Monte Carlo dropout passes [@gal2016]."
    )


def _group_paragraph(config: RunConfig, scans: Sequence | None) -> str:
    from ..registration import resolve_engine

    engine = resolve_engine(config.registration)
    if config.reference_scanner:
        ref = f"Scanner {config.reference_scanner} was chosen as the reference scanner."
    else:
        ref = (
            "The scanner with the highest mean white-matter SNR was chosen as the reference "
            "scanner [@tong2020]."
        )
    split = (
        "40 % of the traveling subjects (participants scanned on every scanner), drawn at "
        f"random with seed {config.seed}, were used for training"
    )
    if config.train_participants:
        split = (
            f"{_count(len(config.train_participants), 'traveling subject')} "
            f"({', '.join('sub-' + p for p in config.train_participants)}) "
            f"{'was' if len(config.train_participants) == 1 else 'were'} used for training"
        )
    elif scans is not None:
        from ..study import plan_study

        try:
            plan = plan_study(scans, reference=config.reference_scanner, seed=config.seed)
        except ValueError:
            plan = None
        if plan is not None:
            split = (
                f"{len(plan.training)} of the {len(plan.traveling)} traveling subjects "
                f"({', '.join('sub-' + p for p in plan.training)}, drawn at random with "
                f"seed {config.seed}) {'was' if len(plan.training) == 1 else 'were'} used for "
                "training"
            )
    if config.reference_labels == "rescan":
        own = (
            "each scan of the reference scanner was labelled with the same subject's other "
            "run on that scanner, so that its network, too, learned the maps from "
            "independently noisy labels rather than to reproduce its input [@lehtinen2018] "
            "(scans without a repeat kept their own maps)"
        )
    else:
        own = "the reference scanner's own scans kept their own maps"
    if engine == "none":
        reg = (
            "The scans were already aligned on one voxel grid, so the reference maps were "
            f"used as labels without registration; {own}."
        )
    else:
        reg = (
            "The reference scanner's IRLLS DKI maps of each training subject were registered "
            "non-linearly into the DWI space of that subject's scans on every other scanner "
            f"with {_ENGINE_TEXT[engine]}, giving voxel-aligned training labels; {own}. "
            "Voxels whose labels were interpolated partly from outside the reference brain "
            "mask were not trained on."
        )
    return (
        "DKI maps were harmonized across scanners with the deep-learning method of "
        f"@tong2020. {ref} {split[0].upper() + split[1:]}, the others serving as test "
        f"subjects. {reg} For each scanner, including the reference scanner, "
        f"{_network_sentence(config)} was trained to map the scan's DWIs (divided by the "
        f"mean b=0 signal){_fit_input_clause(config)} to the eight reference DKI maps. "
        f"{_training_sentence(config)} Beside each network, a linear baseline (per map, a "
        "least-squares regression from the scan's own DKI map to the reference label) was "
        "fitted on the same training voxels; on the held-out validation blocks, each map was "
        "harmonized by the network only where its NRMSE was lower than the baseline's, else "
        "by the baseline. Every scan of every participant was then passed through its "
        "scanner's harmonizer to obtain harmonized MD, AD, RD, FA, MK, AK, RK and "
        f"KFA maps.{_mc_sentence(config)} Every evaluation score is reported beside a noise "
        "floor, the reference scan's own noise level (from its rescan, or, without one, from "
        "two interleaved halves of its directions fitted alike and scaled to a full scan)."
    )


def _models_paragraph(config: RunConfig) -> str:
    return (
        "Harmonized DKI maps were computed with the per-scanner networks of a previous "
        f"group-level run ({config.models_dir.name if config.models_dir else 'models'}): "
        f"{_network_sentence(config)}, trained to reproduce the reference scanner's IRLLS "
        "maps from each scanner's DWIs [@tong2020]; each model was used only for scans "
        "matching the protocol it was trained on. Inference ran in PyTorch "
        f"{_version('torch')} [@paszke2019].{_mc_sentence(config)}"
    )


def _comparators_paragraph(comparators: Sequence[str]) -> str:
    comparators = [c.lower() for c in comparators]
    parts = []
    if "combat" in comparators:
        parts.append(
            "ComBat [@fortin2017; @fortin2018] applied voxelwise to the DKI maps with "
            "neuroHarmonize [@pomponio2020]"
        )
    if "rish" in comparators:
        parts.append(
            "rotation-invariant spherical harmonic (RISH) feature scaling of the DWI signal "
            "[@mirzaalian2016] before the DKI fit"
        )
    if not parts:
        return ""
    return "For comparison, the maps were also harmonized with " + " and with ".join(parts) + "."


def methods_paragraphs(config: RunConfig, *, scans: Sequence | None = None) -> list[str]:
    """The methods text of a run as paragraphs with ``[@key]`` citation markers.

    Parameters
    ----------
    config : RunConfig
        The options of the run (``preproc="auto"`` is resolved on this machine).
    scans : list of DWIScan, optional
        The selected scans: adds their counts, the runs TOPUP corrects and the training
        subjects drawn with the seed.
    """
    preproc = resolved_preproc_mode(config.preproc, config.denoiser, check=False)
    paragraphs = [
        f"Results included in this manuscript come from processing performed with dkiharm "
        f"{__version__}, an implementation of the DKI harmonization method of @tong2020, "
        f"built on Nipype {_version('nipype')} [@gorgolewski2011; @nipypesoftware] "
        f"and dipy {_version('dipy')} [@dipy]."
        + (f" {_data_sentence(config, scans)}" if scans else ""),
        _preproc_paragraph(config, preproc, scans),
        _fit_paragraph(config),
    ]
    if config.analysis_level == "group":
        paragraphs.append(_group_paragraph(config, scans))
    elif config.models_dir is not None:
        paragraphs.append(_models_paragraph(config))
    extra = _comparators_paragraph(getattr(config, "comparators", ()) or ())
    if extra:
        paragraphs.append(extra)
    paragraphs.append(
        "The above methods text was generated automatically by dkiharm from the options of "
        "the run, with the intention that users copy and paste it into their manuscripts "
        "unchanged; it is released under the CC0 license."
    )
    return paragraphs


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
    config: RunConfig, logs_dir: Path, *, scans: Sequence | None = None
) -> dict[str, Path]:
    """Write ``CITATION.{md,html,tex,bib}`` into ``logs_dir`` (each file atomically).

    Returns the written paths by extension (``md``, ``html``, ``tex``, ``bib``).
    """
    from ..utils.io import atomic_write_text

    paragraphs = methods_paragraphs(config, scans=scans)
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
