"""The data package's error: bad input, named by file (or URI), row group and column."""


class DataError(ValueError):
    """Bad input data; the message names the file and column at fault."""
