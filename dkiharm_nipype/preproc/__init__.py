"""Preprocessing science that is not a Nipype built-in node: what the ``--preproc`` modes
mean (:mod:`.modes`), MP-PCA denoising in torch (:mod:`.denoise`), Python brain masks
(:mod:`.masks`)."""
