"""Whole-slide images: reading at a target resolution, tissue detection, annotations, tile grids.

Nothing here imports torch: the slide tools (mlps tile, mlps_dist.deploy.segment_slides)
and any deployment code read and stitch slides with numpy, PIL, OpenSlide and shapely only.
"""
