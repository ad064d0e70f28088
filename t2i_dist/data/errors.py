"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the URL and the fix."""
