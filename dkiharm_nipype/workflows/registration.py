"""Registration of the reference scanner's DKI labels into a target scan's DWI space."""

from __future__ import annotations

from nipype.interfaces import fsl
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.registration import CheckRegistration, RegisterMaps
from ..registration import SUPPORT_TOLERANCE, resolve_engine

#: FNIRT configuration shipped with FSL for FA-to-FA registration (Andersson et al. 2007).
FNIRT_CONFIG = "FA_2_FMRIB58_1mm"

#: Its sub-sampling levels (8, 4, 2, 2 at a 1 mm template) halved for 2 mm DWI grids.
FNIRT_SUBSAMPLING = [4, 2, 1, 1]


def init_label_registration_wf(
    *,
    engine: str = "auto",
    omp_nthreads: int = 1,
    seed: int = 0,
    name: str = "label_reg_wf",
) -> pe.Workflow:
    """Register reference-scanner DKI maps non-linearly into a target scan's DWI space.

    The paper (section 2.2) registers the reference scanner's IRLLS maps of each training
    subject to that subject's target-scanner DWIs with FSL FNIRT: the moving FA to the
    fixed FA, affine then non-linear; the transform carries the maps (trilinear) and mask.

    Workflow Graph
        .. workflow::
            :graph2use: orig
            :simple_form: yes

            from dkiharm_nipype.workflows.registration import init_label_registration_wf
            wf = init_label_registration_wf(engine="dipy-syn")

    Parameters
    ----------
    engine : {"auto", "fnirt", "dipy-syn", "mrtrix", "ants", "none"}
        ``fnirt``: FSL FLIRT (12 dof, correlation ratio) -> FNIRT (``FA_2_FMRIB58_1mm``
        configuration with sub-sampling adapted to 2 mm) -> ApplyWarp per map, passed on
        only if FNIRT's warped FA is not less alike the fixed image than before
        (:class:`~dkiharm_nipype.interfaces.registration.CheckRegistration`). Open
        engines run in one :class:`~dkiharm_nipype.interfaces.registration.RegisterMaps`
        node. ``none``: the scans are already aligned on one grid (two protocols of one
        session); maps pass through unchanged. ``auto``: FNIRT when FSL is installed,
        otherwise :data:`~dkiharm_nipype.registration.DEFAULT_OPEN_ENGINE`.
    omp_nthreads, seed : int
        Threads of the registration node; seed of stochastic engines.
    name : str
        Workflow name.

    Inputs
    ------
    fixed_image
        Target scan's FA (or mean b0) in its DWI space.
    moving_image, moving_maps, moving_mask
        Reference scan's FA, list of DKI maps and brain mask (on the moving grid).

    Outputs
    -------
    registered_maps, registered_mask
        ``moving_maps`` (same order) and ``moving_mask`` (nearest neighbour) on the target.
    support_mask
        Target voxels whose labels were interpolated from reference-brain voxels only
        (``moving_mask`` resampled trilinearly, kept where it is 1): outside it a label is
        blended with the zeros around the reference brain and must not be trained on.
    transform
        FNIRT warp coefficients, or the deformation field of an open engine.

    Raises
    ------
    UnknownEngineError, FNIRTNotFoundError, EngineNotAvailableError
        At build time, if ``engine`` is unknown or its software is missing.

    Examples
    --------
    Bring an atlas's maps and mask into a subject's DWI space, in a larger workflow:

    >>> wf = pe.Workflow(name="my_pipeline")
    >>> subject = pe.Node(niu.IdentityInterface(fields=["fa"]), name="subject")
    >>> atlas = pe.Node(niu.IdentityInterface(fields=["fa", "maps", "mask"]), name="atlas")
    >>> reg_wf = init_label_registration_wf(engine="dipy-syn", omp_nthreads=2, seed=1)
    >>> wf.connect([
    ...     (subject, reg_wf, [("fa", "inputnode.fixed_image")]),
    ...     (atlas, reg_wf, [("fa", "inputnode.moving_image"), ("maps", "inputnode.moving_maps"),
    ...                      ("mask", "inputnode.moving_mask")]),
    ... ])
    >>> sorted(reg_wf.list_node_names())
    ['first_label', 'inputnode', 'mask_list', 'outputnode', 'register_maps']
    >>> reg_wf.get_node("register_maps").inputs.engine
    'dipy-syn'
    """
    engine = resolve_engine(engine)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["fixed_image", "moving_image", "moving_maps", "moving_mask"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["registered_maps", "registered_mask", "support_mask", "transform"]
        ),
        name="outputnode",
    )

    if engine == "fnirt":
        _add_fnirt_steps(workflow, inputnode, outputnode)
        return workflow

    register_maps = pe.Node(
        RegisterMaps(engine=engine, num_threads=omp_nthreads, seed=seed),
        name="register_maps",
        n_procs=omp_nthreads,
        mem_gb=2,  # SyN keeps several displacement fields of the full volume
    )
    mask_list = pe.Node(niu.Merge(1), name="mask_list")
    first_label = pe.Node(niu.Select(index=0), name="first_label")
    moving = ["fixed_image", "moving_image", "moving_maps", "moving_mask"]
    results = ["registered_maps", "support_mask", "transform"]
    workflow.connect([
        (inputnode, register_maps, [(f, f) for f in moving]),
        (inputnode, mask_list, [("moving_mask", "in1")]),
        (mask_list, register_maps, [("out", "label_maps")]),
        (register_maps, first_label, [("registered_labels", "inlist")]),
        (register_maps, outputnode, [(f, f) for f in results]),
        (first_label, outputnode, [("out", "registered_mask")]),
    ])  # fmt: skip
    return workflow


def _add_fnirt_steps(workflow, inputnode, outputnode) -> None:
    """FLIRT -> FNIRT -> ApplyWarp (maps, mask, support) -> correlation guard, in place."""
    flirt = pe.Node(
        fsl.FLIRT(dof=12, cost="corratio", interp="trilinear"),
        name="flirt",
        n_procs=1,
    )
    fnirt = pe.Node(
        fsl.FNIRT(
            config_file=FNIRT_CONFIG,
            subsampling_scheme=FNIRT_SUBSAMPLING,
            fieldcoeff_file=True,
        ),
        name="fnirt",
        n_procs=1,
        mem_gb=2,  # FNIRT's warp field and Hessian at 2 mm
    )
    applywarp_maps = pe.MapNode(
        fsl.ApplyWarp(interp="trilinear"), iterfield=["in_file"], name="applywarp_maps"
    )
    applywarp_mask = pe.Node(fsl.ApplyWarp(interp="nn"), name="applywarp_mask")
    # float output: a uint8 mask resampled in its own type would be rounded to 0/1
    applywarp_support = pe.Node(
        fsl.ApplyWarp(interp="trilinear", datatype="float"), name="applywarp_support"
    )
    # FNIRT's result never passes through register(): the same correlation guard here
    check = pe.Node(CheckRegistration(engine="fnirt"), name="check_registration")
    threshold_support = pe.Node(
        fsl.ImageMaths(op_string=f"-thr {1 - SUPPORT_TOLERANCE:g} -bin", out_data_type="char"),
        name="threshold_support",
    )
    workflow.connect(
        [
            (inputnode, flirt, [("moving_image", "in_file"), ("fixed_image", "reference")]),
            (inputnode, fnirt, [
                ("moving_image", "in_file"),
                ("fixed_image", "ref_file"),
                ("moving_mask", "inmask_file"),
            ]),
            (flirt, fnirt, [("out_matrix_file", "affine_file")]),
            (inputnode, applywarp_maps, [
                ("moving_maps", "in_file"),
                ("fixed_image", "ref_file"),
            ]),
            (inputnode, applywarp_mask, [
                ("moving_mask", "in_file"),
                ("fixed_image", "ref_file"),
            ]),
            (inputnode, applywarp_support, [
                ("moving_mask", "in_file"),
                ("fixed_image", "ref_file"),
            ]),
            (fnirt, applywarp_maps, [("fieldcoeff_file", "field_file")]),
            (fnirt, applywarp_mask, [("fieldcoeff_file", "field_file")]),
            (fnirt, applywarp_support, [("fieldcoeff_file", "field_file")]),
            (applywarp_support, threshold_support, [("out_file", "in_file")]),
            (threshold_support, outputnode, [("out_file", "support_mask")]),
            (inputnode, check, [
                ("fixed_image", "fixed_image"),
                ("moving_image", "moving_image"),
                ("moving_mask", "moving_mask"),
            ]),
            (fnirt, check, [("warped_file", "registered_image")]),
            (applywarp_maps, check, [("out_file", "registered_maps")]),
            (check, outputnode, [("registered_maps", "registered_maps")]),
            (applywarp_mask, outputnode, [("out_file", "registered_mask")]),
            (fnirt, outputnode, [("fieldcoeff_file", "transform")]),
        ]
    )  # fmt: skip
