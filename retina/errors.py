"""Typed errors whose message is one line a user can act on.

The command line prints the message alone and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class RetinaError(Exception):
    """An error caused by the user's input or environment, not by a bug in retina."""


class DataError(RetinaError):
    """A data folder, image file or split request that cannot be used."""


class SweepFileError(RetinaError):
    """A sweep file that is not valid YAML or does not match the schema."""


class TrackingError(RetinaError):
    """An MLflow tracking store, experiment, run or artifact that cannot be used."""


class DownloadError(RetinaError):
    """A dataset download or archive that failed or was refused."""
