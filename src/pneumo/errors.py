"""Errors a user can cause. The CLI turns each into one line on stderr and a non-zero exit."""


class PneumoError(Exception):
    """Base of every error caused by input (a file, a parameter, a directory), not by a bug."""


class DicomError(PneumoError):
    """A DICOM file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DataError(PneumoError):
    """A data directory, CSV or cache that cannot be used."""


class ConfigError(PneumoError):
    """A parameter that is unknown, of the wrong type or out of range."""


class SubmissionError(PneumoError):
    """A malformed submission or labels file."""


class RunError(PneumoError):
    """A run directory that cannot be (re)used."""


class TrainingDiverged(PneumoError):
    """The loss became NaN or infinite: the learning rate is too high for this optimizer."""


class SweepError(PneumoError):
    """A sweep that cannot start (bad params file, unknown parameter, ...)."""


class ClusterError(PneumoError):
    """A cluster that cannot be reached or built."""


class ModelError(PneumoError):
    """A model (run directory, model directory or checkpoint) that cannot be loaded."""


def shown(value, width: int = 80) -> str:
    """A value as an error message may quote it: its repr cut to a few items and about `width`
    characters, so that quoting a hostile value (a YAML "billion laughs" list, a megabyte
    string) costs as little as quoting a number."""
    import reprlib

    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel = 3
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 6
    short.maxstring = short.maxother = width
    text = short.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
