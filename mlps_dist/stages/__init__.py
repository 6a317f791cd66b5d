"""The four pipeline stages, each runnable as a module under torchrun: train_classifier,
generate_masks, train_segmenter, evaluate (and the checks made before any of them starts).
"""
