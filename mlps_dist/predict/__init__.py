"""The torch side of a trained run: loading its models (gate), the predictor every evaluation
and prediction path uses, the slide model, and the ONNX export.
"""
