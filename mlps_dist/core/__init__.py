"""Torch-free foundations every layer uses: errors and exit statuses, atomic files, output folders,
progress lines, process trees, image row readers and PNG streams, drawing, stain normalisation.

Nothing here imports torch (tests/test_layers.py imports it with torch blocked).
"""
