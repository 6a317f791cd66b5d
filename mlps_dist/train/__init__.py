"""Training machinery shared by stages 1 and 3: the loop (engine), DDP/DeepSpeed wrapping,
precision, EMA, checkpoints, the health guard and its rollbacks, GPU options, speed meters.
"""
