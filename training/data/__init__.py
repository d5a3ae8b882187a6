"""Data set readers and the training loader.

Every reader yields ``(image, labels, mask)``: ``image`` float32 1×H×W in [-1, 1], ``labels`` float32
[14] multi-hot in :data:`service.labels.LABELS` order, ``mask`` float32 [14], 1 where the label is known.
"""

from training.data.base import DataFormatError, ImageDataset
from training.data.cache import ResizeCache
from training.data.chexpert import CheXpert
from training.data.dicom import DecoderMissingError, DicomDataset, decode_dicom
from training.data.factory import open_dataset
from training.data.folder import ImageFolder
from training.data.images import IMAGE_EXTENSIONS, ImageSkipped, decode_image, to_tensor
from training.data.loader import EpochSampler, infinite_batches, make_loader
from training.data.nih import NIHChestXray14, assign_splits, read_data_entry
from training.data.phantom import PhantomDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "CheXpert",
    "DataFormatError",
    "DecoderMissingError",
    "DicomDataset",
    "EpochSampler",
    "ImageDataset",
    "ImageFolder",
    "ImageSkipped",
    "NIHChestXray14",
    "PhantomDataset",
    "ResizeCache",
    "assign_splits",
    "decode_dicom",
    "decode_image",
    "infinite_batches",
    "make_loader",
    "open_dataset",
    "read_data_entry",
    "to_tensor",
]
