"""MLPS (multi-layer pseudo-supervision) for weakly supervised histopathology segmentation,
trained on one or many GPUs; ``mlps --help`` lists the commands."""

__version__ = "0.2.0"
