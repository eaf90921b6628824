"""One error hierarchy for the whole project.

Every message names what is wrong and where: the file, column, row, scenario or config key.
"""


class RelevanceError(Exception):
    """Base class: a problem the user can fix (bad input, bad config); not a bug."""


class ConfigError(RelevanceError):
    """The configuration is invalid. The message lists every problem at once."""


class DataError(RelevanceError):
    """Input data is unreadable or does not match the expected schema (names file and column)."""


class DataGateFailed(DataError):
    """Too many rows were rejected or quarantined (names the rate, the threshold and the top reasons)."""


class RejectRateExceeded(DataGateFailed):
    """Ingestion: the reject rate passed data.max_reject_rate."""


class QuarantineRateExceeded(DataGateFailed):
    """Batch scoring: the quarantine rate passed serving.max_quarantine_rate."""


class ServiceUnavailable(RelevanceError):
    """An outside service (MLflow tracking or registry, an object store) did not answer within its timeout."""


class ResourceUnavailable(RelevanceError):
    """The environment refused: a full disk or file-size limit, a read-only or unwritable path, a worker that
    died, a lease held by another run. Not a bug and not bad input: fix it and rerun (exit 8)."""


class WorkerLost(ResourceUnavailable):
    """A worker process or Ray actor died mid-job (killed, out of memory, its node lost); names the worker."""


class LeaseBusy(ResourceUnavailable):
    """Another promotion of the registered model held its lease for longer than we could wait."""


class LeaseLost(ResourceUnavailable):
    """This promotion's lease lapsed or was taken over before the aliases moved; nothing was moved."""


class TrainingDiverged(RelevanceError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class UnknownScenario(RelevanceError):
    """A scenario is not among those the model was trained on."""
