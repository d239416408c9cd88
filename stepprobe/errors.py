"""One exception type for problems a user can fix; the CLI prints it as one line."""


class StepprobeError(Exception):
    """Bad input, a mismatched artifact, a missing file: printed as ``error: <message>``."""


class ArtifactMismatch(StepprobeError):
    """An artifact (traces, HDF5, study, checkpoint) does not match what the reader expects."""
