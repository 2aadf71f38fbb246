"""The one exception type users see: the CLI prints it as a single stderr line and exits non-zero."""


class FeatstoreError(Exception):
    """A failure caused by input, environment or store state, explained in one line."""

    exit_code = 2


class ModelUnavailable(FeatstoreError):
    """The requested weights cannot be had here (e.g. offline without a cached checkpoint)."""


class StoreLocked(FeatstoreError):
    """Another process is writing to the store."""

    exit_code = 3
