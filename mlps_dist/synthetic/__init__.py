"""Synthetic data for the demo, the tests and the variants: H&E-like patches in the
LUAD-HistoSeg layout (patches), their tissue textures, the variant options, and synthetic
whole slides with annotations (slides).
"""
