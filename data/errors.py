"""Errors and warnings of the data layer, so callers can catch them by kind."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input to the data layer (a name, a split, a size or a document)."""


class UnknownDatasetError(DataError):
    """A dataset name that the registry does not know."""


class UnknownSplitError(DataError):
    """A split that the dataset does not have."""


class OfflineUnavailableError(DataError):
    """The dataset exists only on the Hugging Face Hub and the loader is offline."""


class HubLoadError(DataError):
    """Loading from the Hugging Face Hub failed (unreachable, gated, or a bad id)."""


class DatasetSizeWarning(UserWarning):
    """Fewer documents were available than requested; all of them were returned."""
