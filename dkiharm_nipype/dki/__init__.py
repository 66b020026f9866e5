"""Diffusion kurtosis imaging: design matrix, robust fitting and scalar maps.

* :mod:`.design` – the linear DKI signal model (dipy element order).
* :mod:`.metrics` – MD, AD, RD, FA, MK, AK, RK, KFA with dipy's definitions.
* :mod:`.fit` – OLS, WLS and IRLLS (robust, outlier-rejecting) fits.
* :mod:`.simulate` – plausible ground-truth tensors from Gaussian compartments.
"""

from .design import design_matrix, dki_signal, params_to_tensors, tensors_to_params
from .fit import METHODS, DKIFit, DKIInputError, fit_dki, validate_gradients
from .maps import ALL_METRICS, dki_metrics

__all__ = [
    "ALL_METRICS",
    "METHODS",
    "DKIFit",
    "DKIInputError",
    "fit_dki",
    "validate_gradients",
    "design_matrix",
    "dki_metrics",
    "dki_signal",
    "params_to_tensors",
    "tensors_to_params",
]
