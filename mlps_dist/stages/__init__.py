"""The four pipeline stages, each runnable as a module under torchrun: train_classifier,
generate_masks, train_segmenter, evaluate; session.py is what every one of them runs in
(parse, checks, lock, log, stamp) and the checks of a whole pipeline before its first stage.
"""
