"""Datasets, label corruption, validation splits and device-resident batches.

Everything a probe needs to get images in front of a model:

* :func:`load_dataset` reads CIFAR-10, CIFAR-100 and SVHN from their published
  archives (parsed here, no torchvision), CIFAR-10-C/CIFAR-100-C (one corruption
  at one severity), user ``.npz``/``.npy`` files, or builds the built-in
  ``synthetic`` dataset that needs no download at all.
* Training labels can be partially corrupted (:func:`symmetric_label_noise`) or
  replaced by a stored vector, and a validation split can be carved from train
  (:func:`validation_split`); every sample keeps its row in the original split
  (``Split.index``) so per-sample probes can line results up across runs.
* :func:`iterate_batches` and :func:`random_crop_flip` serve batches straight
  from a split that already lives on the accelerator: slicing, gathering, the
  uint8 -> float conversion and augmentation all run on the device, with no
  host synchronisation inside the loop.
* :func:`download_dataset` / :func:`fetch_url` download with resume and MD5
  verification and extract archives safely.

Layout, one idea per module: ``types`` (:class:`Split`, :class:`Dataset`, :class:`Batch`),
one parser per source format (``cifar``, ``svhn``, ``npz``, ``corrupted``, ``synthetic``),
``arrays`` (the layout/dtype/range rules of numpy image and label arrays), ``labels``
(label noise, label files and their checks, validation split), ``download`` (generic fetch/MD5/extract), ``published``
(where CIFAR-10/100 and SVHN live on disk and online: :data:`SOURCES`,
:func:`download_dataset`), ``batches`` (device batches and augmentation), ``catalog``
(:data:`DATASETS`, :func:`default_data_dir`), ``checks`` (shared argument checks) and
``load`` (:func:`load_dataset`, tying them together). Import from ``atprobe.data``:
every public name is re-exported here.

See ``docs/data.md`` for the definitions (file layouts, synthetic data, noise).
"""

from atprobe.data.batches import iterate_batches, random_crop_flip
from atprobe.data.catalog import DATASETS, NUM_CLASSES, PROBE_DATASETS, TEST_ONLY_DATASETS, default_data_dir
from atprobe.data.corrupted import CORRUPTIONS, check_corruption
from atprobe.data.download import Resource, fetch_url
from atprobe.data.labels import check_labels, read_label_file, symmetric_label_noise, validation_split
from atprobe.data.load import load_dataset
from atprobe.data.published import SOURCES, download_dataset
from atprobe.data.synthetic import make_synthetic
from atprobe.data.types import Batch, Dataset, Split

__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "NUM_CLASSES",
    "PROBE_DATASETS",
    "SOURCES",
    "TEST_ONLY_DATASETS",
    "Batch",
    "Dataset",
    "Resource",
    "Split",
    "check_corruption",
    "check_labels",
    "default_data_dir",
    "download_dataset",
    "fetch_url",
    "iterate_batches",
    "load_dataset",
    "make_synthetic",
    "random_crop_flip",
    "read_label_file",
    "symmetric_label_noise",
    "validation_split",
]
