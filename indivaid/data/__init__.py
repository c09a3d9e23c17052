"""Datasets: catalogues, adapters, splits, the image cache and the batch pipeline.

Import submodules directly (``indivaid.data.split``); this package only re-exports the common
entry points so ``from indivaid.data import open_dataset, build_split`` works.
"""

from indivaid.data.adapters import DATASETS, PROTOCOLS, DatasetInfo, make_adapter, open_dataset
from indivaid.data.catalogue import Catalogue, DataError, Sample, validate_catalogue
from indivaid.data.split import Split, SplitConfig, build_split, read_split, write_split

__all__ = [
    "DATASETS", "PROTOCOLS", "Catalogue", "DataError", "DatasetInfo", "Sample", "Split", "SplitConfig",
    "build_split", "make_adapter", "open_dataset", "read_split", "validate_catalogue", "write_split",
]
