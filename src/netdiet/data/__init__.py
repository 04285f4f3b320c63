"""Dataset registry: name -> loader returning a `Dataset` of in-memory tensors."""
from netdiet.data.registry import Dataset, get_dataset, list_datasets, register_dataset

__all__ = ["Dataset", "get_dataset", "list_datasets", "register_dataset"]
