"""Using a model: the torch-free ONNX model, sliding windows, image inference (infer) and
whole-slide segmentation (segment_slides). A run's torch models are imported lazily, only
when a run rather than an exported model is given.
"""
