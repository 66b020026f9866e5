"""Writing BIDS-Derivatives file names (diffusion-derivatives naming, BEP016)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    Undefined,
    isdefined,
    traits,
)

from ..utils.bids import derivative_path
from ..utils.io import atomic_copy, atomic_write_text

_IMAGE_EXTENSIONS = (".nii.gz", ".nii")
#: Gradient tables share the NIfTI's sidecar: a sink of theirs writes none.
_GRADIENT_EXTENSIONS = (".bval", ".bvec")


def derivative_name(
    source_file: str | os.PathLike,
    *,
    suffix: str,
    extension: str = ".nii.gz",
    **entities: str | None,
) -> Path:
    """Relative BIDS-Derivatives path for an output derived from ``source_file``.

    Every entity of the source is kept (:func:`dkiharm_nipype.utils.bids.derivative_path`):

    >>> str(derivative_name("/data/sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_run-1_dwi.nii.gz",
    ...     space="dwi", model="dki", param="mk", suffix="dwimap"))
    'sub-01/ses-A/dwi/sub-01_ses-A_dir-PA_run-1_space-dwi_model-dki_param-mk_dwimap.nii.gz'
    """
    return derivative_path(source_file, suffix=suffix, extension=extension, **entities)


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Directory(mandatory=True, desc="root of the derivatives tree")
    source_file = File(desc="raw BIDS file the output derives from (names the output)")
    rel_path = traits.Str(
        desc="relative output path, instead of a name from source_file "
        "(dataset-level files such as models)"
    )
    in_file = File(exists=True, mandatory=True, desc="file to store")
    suffix = traits.Str("dwimap", usedefault=True, desc="BIDS suffix of the output")
    extension = traits.Str(".nii.gz", usedefault=True, desc="file extension")
    space = traits.Str(desc="space entity (e.g. dwi)")
    model = traits.Str(desc="model entity (e.g. dki)")
    param = traits.Str(desc="param entity (e.g. mk)")
    label = traits.Str(desc="label entity (e.g. brain for masks)")
    desc = traits.Str(desc="desc entity (e.g. harmonized)")
    meta_dict = traits.Dict(desc="JSON sidecar content; written next to the file when given")
    meta_file = File(
        exists=True,
        desc="JSON sidecar to copy next to the file (default: the "
        "JSON next to in_file with the same name, when there is one)",
    )


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(desc="the stored file")
    out_meta = File(desc="the stored sidecar, if any")


class DerivativesDataSink(SimpleInterface):
    """Store one output under its BIDS-Derivatives name (atomic copy, optional sidecar).

    Examples
    --------
    >>> sink = DerivativesDataSink(base_directory="/out", space="dwi", model="dki",
    ...                            param="fa")
    >>> sink.inputs.suffix
    'dwimap'

    Store a map made by any node of an existing pipeline under its BIDS-Derivatives name:

    >>> import tempfile
    >>> from nipype.interfaces import utility as niu
    >>> from nipype.pipeline import engine as pe
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / "mk.nii.gz").write_bytes(b"any file")
    >>> wf = pe.Workflow(name="my_pipeline", base_dir=str(tmp / "work"))
    >>> fit = pe.Node(niu.IdentityInterface(fields=["mk_file"]), name="fit")
    >>> fit.inputs.mk_file = str(tmp / "mk.nii.gz")
    >>> ds_mk = pe.Node(DerivativesDataSink(base_directory=str(tmp / "out"), space="dwi",
    ...                                     model="dki", param="mk",
    ...                                     meta_dict={"Description": "mean kurtosis"}),
    ...                 name="ds_mk")
    >>> ds_mk.inputs.source_file = "/data/sub-01/ses-A/dwi/sub-01_ses-A_run-1_dwi.nii.gz"
    >>> wf.connect(fit, "mk_file", ds_mk, "in_file")
    >>> _ = wf.run()
    >>> sorted(p.relative_to(tmp / "out").as_posix() for p in (tmp / "out").rglob("*.*"))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['sub-01/ses-A/dwi/sub-01_ses-A_run-1_space-dwi_model-dki_param-mk_dwimap.json',
     'sub-01/ses-A/dwi/sub-01_ses-A_run-1_space-dwi_model-dki_param-mk_dwimap.nii.gz']
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        ent = {k: getattr(self.inputs, k) for k in ("space", "model", "param", "label", "desc")}
        ent = {k: (v if isdefined(v) else None) for k, v in ent.items()}
        if isdefined(self.inputs.rel_path):
            rel = Path(self.inputs.rel_path)
        elif isdefined(self.inputs.source_file):
            rel = derivative_name(
                self.inputs.source_file,
                suffix=self.inputs.suffix,
                extension=self.inputs.extension,
                **ent,
            )
        else:
            raise ValueError("DerivativesDataSink needs source_file or rel_path")
        out = Path(self.inputs.base_directory) / rel
        atomic_copy(self.inputs.in_file, out)
        self._results["out_file"] = str(out)
        meta = dict(self.inputs.meta_dict) if isdefined(self.inputs.meta_dict) else {}
        meta_file = self.inputs.meta_file
        if not isdefined(meta_file):
            in_file = Path(self.inputs.in_file)
            sibling = in_file.with_name(in_file.name.split(".")[0] + ".json")
            meta_file = sibling if sibling.is_file() else None
        if meta_file:
            meta = {**json.loads(Path(meta_file).read_text()), **meta}
        has_source = isdefined(self.inputs.source_file)
        if has_source:
            # provenance points at the raw file (BIDS URI), not at a work-directory name
            raw_uri = f"bids:raw:{rel.parent.as_posix()}/{Path(self.inputs.source_file).name}"
            if ent["space"] and self.inputs.extension in _IMAGE_EXTENSIONS:
                # a space that is no template (space-dwi: the scan's own grid) names its image
                meta.setdefault("SpatialReference", raw_uri)
        if meta and has_source and self.inputs.extension not in _GRADIENT_EXTENSIONS:
            meta["Sources"] = [raw_uri]
            sidecar = out.with_name(out.name[: -len(self.inputs.extension)] + ".json")
            atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", sidecar)
            self._results["out_meta"] = str(sidecar)
        else:
            self._results["out_meta"] = Undefined
        return runtime


class _OptionalDerivativesDataSinkInputSpec(_DerivativesDataSinkInputSpec):
    in_file = File(exists=True, desc="file to store; nothing is stored when undefined")


class OptionalDerivativesDataSink(DerivativesDataSink):
    """A :class:`DerivativesDataSink` storing nothing when ``in_file`` is undefined: an
    optional output, e.g. the OOD mask of a model card trained without an OOD model."""

    input_spec = _OptionalDerivativesDataSinkInputSpec

    def _run_interface(self, runtime):
        if not isdefined(self.inputs.in_file):
            self._results.update(out_file=Undefined, out_meta=Undefined)
            return runtime
        return super()._run_interface(runtime)
