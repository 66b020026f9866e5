"""Traveling-subject phantom: virtual subjects on virtual scanners, written as BIDS.

>>> from dkiharm_nipype.phantom import generate
>>> root = generate("bids_examples/tiny", preset="tiny", seed=0)  # doctest: +SKIP
"""

from .anatomy import Lesion
from .generate import PhantomError, generate
from .presets import PRESET_NAMES, get_preset

__all__ = ["PRESET_NAMES", "Lesion", "PhantomError", "generate", "get_preset"]
