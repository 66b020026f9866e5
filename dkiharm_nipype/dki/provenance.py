"""How a DKI map was made, once: the BEP016 ``Model`` object of the map sidecars.

The values come from the fit's own code (the defaults of :func:`~.fit.fit_dki`,
:func:`~.fit.constrain_params` and :func:`~.metrics.dki_metrics`, or the options a fit
reports in :attr:`~.fit.DKIFit.options`), so the sidecars and the methods text
(:func:`constraints_sentence`) cannot drift from what the code does.

The sidecar layout follows the BIDS diffusion-derivatives draft (BEP016): a ``Model``
object with the model's ``Description`` and ``URL``, its ``FitMethod`` and the fit's
``Parameters`` (outlier rejection and constraints included), next to the map's own
``Description`` and ``Units``. File names stay QSIRecon's ``model-dki_param-<map>_dwimap``.
"""

from __future__ import annotations

import inspect
from typing import Any

from .design import N_PARAMS
from .fit import _DIRS, _MAD_TO_SIGMA, constrain_params, fit_dki
from .maps import dki_metrics

#: ``--fit-method`` values and the names the sidecars give them.
FIT_NAMES = {"ols": "OLS", "wls": "WLS", "irlls": "IRLLS"}

FIT_DESCRIPTIONS = {
    "ols": "ordinary linear least squares on ln S",
    "wls": "weighted linear least squares on ln S, weights S_hat^2 from the OLS fit "
    "(Veraart et al. 2013)",
    "irlls": "iteratively reweighted linear least squares with outlier rejection "
    "(Collier et al. 2015; REKINDLE, Tax et al. 2015)",
}

MAP_UNITS = {"md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s", "s0": "arbitrary"}

MAP_DESCRIPTIONS = {
    "md": "mean diffusivity",
    "ad": "axial diffusivity (largest eigenvalue of D)",
    "rd": "radial diffusivity (mean of the two smallest eigenvalues of D)",
    "fa": "fractional anisotropy",
    "mk": "mean kurtosis (analytical, Tabesh et al. 2011)",
    "ak": "axial kurtosis (analytical, Tabesh et al. 2011)",
    "rk": "radial kurtosis (analytical, Tabesh et al. 2011)",
    "kfa": "kurtosis fractional anisotropy (Glenn et al. 2015)",
    "s0": "fitted non-diffusion-weighted signal",
    "outlierfraction": "fraction of the used volumes rejected as outliers per voxel",
}

_KURTOSIS_MAPS = ("mk", "ak", "rk")


def _defaults(func) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def fit_options(**used: Any) -> dict[str, Any]:
    """The fit's settings: :func:`fit_dki`'s defaults, overridden by ``used``.

    ``used`` is what a caller passes to the fit (``method``, ``b_max``, ``constraints``,
    ...) or a fit's :attr:`~.fit.DKIFit.options`.

    >>> opts = fit_options(method="irlls", constraints=True)
    >>> opts["kurtosis_range"], opts["outlier_threshold"], opts["min_diffusivity"]
    ([0.0, 3.0], 3.5, 1e-05)
    """
    options = _defaults(fit_dki)
    options.update({k: v for k, v in used.items() if v is not None or k == "b_max"})
    options["kurtosis_range"] = [float(v) for v in options["kurtosis_range"]]
    return options


def map_clip() -> list[float]:
    """The range MK, AK and RK maps are clipped to (dipy's ``[-3/7, 10]``)."""
    metric_defaults = _defaults(dki_metrics)
    return [float(metric_defaults["min_kurtosis"]), float(metric_defaults["max_kurtosis"])]


def model_object(
    options: dict[str, Any],
    *,
    shells: list[float] | None = None,
    iterations: int | None = None,
) -> dict[str, Any]:
    """The BEP016 ``Model`` object of a DKI fit with ``options`` (see :func:`fit_options`).

    >>> model = model_object(fit_options(method="irlls", constraints=True))
    >>> model["FitMethod"], model["Parameters"]["Constraints"]["DirectionalKurtosisRange"]
    ('IRLLS', [0.0, 3.0])
    >>> model["Parameters"]["OutlierRejection"]["Threshold"]
    3.5
    """
    method = options["method"]
    parameters: dict[str, Any] = {
        "BMax": options.get("b_max"),
        "MinimumSignal": options["min_signal"],
    }
    if shells is not None:
        parameters["BValuesUsed"] = shells
    if method == "irlls":
        parameters["MaxIterations"] = options["max_iter"]
        parameters["Tolerance"] = options["tol"]
        if iterations is not None:
            parameters["Iterations"] = iterations
        parameters["OutlierRejection"] = {
            "Method": "Geman-McClure reweighting of the signal residuals, then rejection of "
            "measurements with |S - S_hat| > Threshold x sigma and a final WLS fit on the "
            "inliers",
            "Threshold": options["outlier_threshold"],
            "NoiseEstimate": f"sigma = {_MAD_TO_SIGMA} x MAD of the signal residuals",
            "MinimumInliers": N_PARAMS + 1,
        }
    else:
        parameters["OutlierRejection"] = "none"
    if options["constraints"]:
        parameters["Constraints"] = {
            "Method": "post-fit projection: eigenvalues of D raised to MinimumDiffusivity; "
            "directional kurtosis K(n) brought into DirectionalKurtosisRange on "
            f"{len(_DIRS)} directions by alternating projections "
            f"({_defaults(constrain_params)['n_rounds']} rounds)",
            "MinimumDiffusivity": options["min_diffusivity"],
            "DirectionalKurtosisRange": list(options["kurtosis_range"]),
        }
    else:
        parameters["Constraints"] = "none"
    return {
        "Description": "Diffusion kurtosis imaging: diffusion tensor D and kurtosis tensor W "
        "of the cumulant expansion of ln S to second order in b (Jensen et al. 2005)",
        "URL": "https://doi.org/10.1002/mrm.20508",
        "FitMethod": FIT_NAMES[method],
        "FitMethodDescription": FIT_DESCRIPTIONS[method],
        "Parameters": parameters,
    }


def map_sidecar(param: str, model: dict[str, Any]) -> dict[str, Any]:
    """The JSON sidecar of one map: its description and units, with the ``Model`` object.

    >>> side = map_sidecar("mk", model_object(fit_options(method="wls", constraints=False)))
    >>> side["Units"], side["ValueRange"], side["Model"]["Parameters"]["Constraints"]
    ('dimensionless', [-0.42857142857142855, 10.0], 'none')
    """
    meta: dict[str, Any] = {
        "Description": MAP_DESCRIPTIONS[param],
        "Units": MAP_UNITS.get(param, "dimensionless"),
        "Model": model,
    }
    if param in _KURTOSIS_MAPS:
        meta["ValueRange"] = map_clip()
    return meta


def constraints_sentence(options: dict[str, Any]) -> str:
    """The constraints as the methods text says them (same values as the sidecars).

    >>> constraints_sentence(fit_options(method="irlls", constraints=True))
    'non-negative diffusivities (eigenvalues of D >= 1e-05 mm²/s), directional kurtosis in [0, 3]'
    """
    if not options["constraints"]:
        return "no constraints"
    low, high = options["kurtosis_range"]
    return (
        f"non-negative diffusivities (eigenvalues of D >= {options['min_diffusivity']:g} "
        f"mm²/s), directional kurtosis in [{low:g}, {high:g}]"
    )
