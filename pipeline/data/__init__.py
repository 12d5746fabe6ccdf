"""Data layer: readers, manifests, splits, validation, statistics, cache, Dataset, transforms."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file, class or key and the fix."""
