"""Reading a dataset's metadata through the wrappers around it (``Subset``, ``FewShot``...)."""

from __future__ import annotations


def dataset_attribute(dataset, name: str, default=None):
    """``dataset.name``, looking through ``Subset``-style wrappers (``.dataset``) when the
    wrapper does not set it itself."""
    while dataset is not None:
        if hasattr(dataset, name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
    return default
