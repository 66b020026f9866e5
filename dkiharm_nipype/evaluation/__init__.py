"""Scoring harmonization: the scores (:mod:`.scores`: CV, NRMSE, SNR, white-matter masks),
the study evaluation (:mod:`.evaluate`) and the validation experiments (:mod:`.experiments`)."""
