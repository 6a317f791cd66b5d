"""The four pipeline stages, the ``mlps`` commands classifier (train_classifier), masks
(generate_masks), segmenter (train_segmenter) and evaluate (evaluate): ``mlps stage STAGE
CONFIG RUN`` on this node, ``torchrun ... -m mlps_dist -- STAGE CONFIG --run RUN`` under a
launcher of one's own. session.py is what every one of them runs in (parse, checks, lock,
log, stamp) and the checks of a whole pipeline before its first stage.
"""
