"""MLPS itself, tensors in and tensors out: class activation maps and Grad-CAMs, their
refinement, the mosaic augmentation of stage 3 and the segmentation metrics.
"""
