"""One typed error tree for the whole project.

Every rejected input ends in a subclass of :class:`FedjetError`, so services can count and log
it by class name instead of crashing. User mistakes (bad flags, bad config) are ``ConfigError``,
which is also a ``ValueError``.
"""

from __future__ import annotations


class FedjetError(Exception):
    """Base of every error fedjet raises on purpose."""

    @property
    def reason(self) -> str:
        """Short machine-friendly name used as a counter key in reports and logs."""
        return type(self).__name__


class ConfigError(FedjetError, ValueError):
    """A flag, config file or spec value is invalid."""


class DataError(FedjetError):
    """Training or evaluation text could not be found or read."""


class CodecError(FedjetError):
    """Base of everything the wire codecs reject."""


class DecodeError(CodecError):
    """Bytes that do not parse as a fedjet frame."""


class LimitError(DecodeError):
    """A declared or actual size exceeds a configured limit (checked before allocating)."""


class SchemaError(CodecError):
    """A frame parses but its fields are missing, mistyped, or of an unknown version."""


class AuthenticationError(CodecError):
    """A message is not from who it claims to be, or was tampered with."""


class ReplayError(CodecError):
    """A message was seen before (its sequence number does not increase)."""


class ValidationError(CodecError):
    """A decoded update is well-formed but unusable: wrong shape, NaN/Inf, unknown tensor."""


class BrokerError(FedjetError):
    """NATS / JetStream could not be reached or answered unexpectedly."""


class BlobError(BrokerError):
    """A chunked blob is inconsistent: missing, duplicated or oversized chunks."""


class AggregationError(FedjetError):
    """An update cannot be folded into the global model."""


class StaleUpdateError(AggregationError):
    """An update's base version is too old (or unknown) to be applied."""


class Terminated(FedjetError):
    """SIGTERM asked a command to stop; what it had started has been stopped."""


class NonFiniteError(AggregationError):
    """Folding an update would make the global weights NaN or Inf; it is rejected instead."""


class PrivacyError(ValidationError):
    """An update of a DP job lacks its privacy claim, or claims parameters other than the job's."""


class JobFinished(FedjetError):
    """The job already has its final version: there is nothing left to do (a clean exit)."""


class RankLostError(FedjetError):
    """A rank of this cloud's group died: the worker stops (its restart starts the group anew)."""


class TrainingError(FedjetError):
    """Local training cannot go on (it diverged again after a reset)."""
