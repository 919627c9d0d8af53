"""igkd.data: datasets as uint8 tensors, seeded splits, and device-resident batches."""

from igkd.data.dataset import Dataset, ImageSet, content_fingerprint
from igkd.data.loader import Batch, DeviceLoader, crop_flip
from igkd.data.sources import DATASETS, load_dataset
from igkd.data.sources.cache import cache_root
from igkd.data.sources.cifar10 import CLASSES as CIFAR10_CLASSES
from igkd.data.splits import stratified_subset, train_val_split

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "Batch",
    "Dataset",
    "DeviceLoader",
    "ImageSet",
    "cache_root",
    "content_fingerprint",
    "crop_flip",
    "load_dataset",
    "stratified_subset",
    "train_val_split",
]
