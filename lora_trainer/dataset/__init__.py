"""The training data: concept folders, captions, aspect-ratio buckets, the latent cache, batches."""
from .folders import DatasetScan, ImageItem, scan_dataset  # noqa: F401
