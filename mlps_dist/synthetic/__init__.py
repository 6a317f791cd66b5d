"""Synthetic data for the demo, the tests and the variants: H&E-like patches in the
LUAD-HistoSeg layout (patches), their tissue textures, the variant options, and synthetic
whole slides with annotations (slides); and mosaics of real labelled tiles with exact
masks (mosaics, mosaic_tiles: a weakly supervised benchmark from a tile collection).
"""
