"""Dataset adapters: the nine paper datasets, generic folder/table inputs and the synthetic set."""

from indivaid.data.adapters import generic, reference, synthetic  # noqa: F401  (registration)
from indivaid.data.adapters.base import (
    DATASETS,
    PROTOCOLS,
    DatasetAdapter,
    DatasetInfo,
    make_adapter,
    open_dataset,
)

__all__ = ["DATASETS", "PROTOCOLS", "DatasetAdapter", "DatasetInfo", "make_adapter", "open_dataset"]
