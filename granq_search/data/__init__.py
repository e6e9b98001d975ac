"""Labelled evaluation datasets with a deterministic, disjoint validation/test split (built-in
ones, or your own through ``data.dataset: MODULE:FACTORY``, see :mod:`granq_search.data.custom`)."""

from granq_search.data.custom import build_custom_data
from granq_search.data.datasets import EvalData, ImageTensorDataset, build_eval_data, split_indices
from granq_search.data.digits import digits_eval_part, digits_train_split

__all__ = [
    "EvalData",
    "ImageTensorDataset",
    "build_eval_data",
    "build_custom_data",
    "split_indices",
    "digits_train_split",
    "digits_eval_part",
]
