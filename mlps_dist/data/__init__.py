"""Data: shard format and reader, dataset layouts, sampling, augmentation, loaders."""
