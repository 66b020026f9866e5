"""Preprocessing science that is not a Nipype built-in node: MP-PCA denoising in torch
(:mod:`.denoise`)."""
