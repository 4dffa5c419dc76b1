"""Errors of the registry workflows: one hierarchy, each message names the fix.

The CLI turns a ``RegistryError`` into a one-line message and exit code 1, in one place. Messages
speak of library arguments and MLflow URIs, never of CLI flags, so they read right from Python too.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Optional


class RegistryError(Exception):
    """Base class: a registry workflow could not do what was asked; the message says how to fix it."""


class ModelNotFoundError(RegistryError):
    """A registered model, version or alias that does not exist, or a URI that names no version."""


class WrongModelError(RegistryError):
    """A version URI of another registered model than the one named."""


class UnknownAliasError(RegistryError):
    """An alias other than the supported ones."""


class UnknownMetricError(RegistryError):
    """A metric name that the metrics registry does not know."""


class GateSyntaxError(RegistryError):
    """A promotion gate that is not ``<metric><op><number>``."""


class AliasBusyError(RegistryError):
    """Another promotion or rollback of the same alias held its lock for longer than we waited."""


class NotEvaluatedError(RegistryError):
    """A gate needs evaluation results the version does not have."""


class GateFailedError(RegistryError):
    """At least one gate did not hold; nothing was moved.

    Attributes:
        results: every gate's ``GateResult``, passing ones included.
    """

    def __init__(self, message: str, results: Sequence = ()):
        super().__init__(message)
        self.results = list(results)


class NothingToRollBackError(RegistryError):
    """The alias has no earlier holder recorded in the audit trail."""


class DatasetError(RegistryError):
    """An evaluation dataset that cannot be read at all (format, columns, empty)."""


class BadRowsError(DatasetError):
    """Rows whose audio is missing or undecodable.

    Attributes:
        bad_rows: the ``BadRow`` entries, each naming the audio path and the reason.
    """

    def __init__(self, bad_rows: Sequence):
        self.bad_rows = list(bad_rows)
        listing = "; ".join(f"{row.where}: {row.reason}" for row in self.bad_rows[:10])
        more = f" (and {len(self.bad_rows) - 10} more)" if len(self.bad_rows) > 10 else ""
        super().__init__(
            f"{len(self.bad_rows)} dataset row(s) have unusable audio: {listing}{more}. "
            "Fix or remove these rows, or evaluate with skip_bad=True to skip and record them."
        )


class RegistrationError(RegistryError):
    """Some or all quantizations failed to convert or register.

    Attributes:
        result: the ``RegistrationResult`` with the versions that did register.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class FinetuneError(RegistryError):
    """Fine-tuning cannot start or continue as asked; the message names the fix."""


class TrainingInterrupted(FinetuneError):
    """SIGINT or SIGTERM stopped training; the run is marked KILLED.

    Attributes:
        signum: the signal number.
        checkpoint: the last checkpoint written to the output directory, if any.
    """

    def __init__(self, signum: int, checkpoint: Optional[str] = None):
        self.signum = signum
        self.checkpoint = checkpoint
        where = f"the last checkpoint is {checkpoint}: resume=True continues from it" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"Fine-tuning was interrupted by {signal.Signals(signum).name}; {where}.")


class FinetuneDataError(DatasetError):
    """A training or evaluation dataset that cannot be used for fine-tuning; names the rows."""


class LanguageError(RegistryError):
    """A language or task the model's tokenizer cannot put in the label prefix."""
