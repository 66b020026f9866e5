"""dkiharm: harmonization of diffusion kurtosis imaging across MRI scanners.

Nipype interfaces and workflows implementing the traveling-subject, deep-learning
harmonization of DKI measures (3-D hierarchical CNN trained per target scanner against
a high-SNR reference scanner), with a traveling-subject phantom for validation.
"""

from .__about__ import __version__

__all__ = ["__version__"]
