"""User-facing error types.

Every mistake a user can make (a bad path, a corrupt file, an unsupported op, a bad flag)
raises a subclass of `IsthmusError`; the CLI prints its message as one line on stderr
and exits with status 2. Anything else is an internal error (a bug) and says so.
"""


class IsthmusError(Exception):
    """Base class: the message is complete and meant for the user."""


class ModelFormatError(IsthmusError):
    """A model file is missing, truncated, corrupt or of an unknown kind."""


class UnsupportedError(IsthmusError):
    """The model uses something isthmus does not implement (an op, an architecture, a quant type)."""


class IRError(IsthmusError):
    """The IR text does not parse, or a graph fails verification."""


class PullError(IsthmusError):
    """The default model could not be fetched or failed its integrity check."""


class InputError(IsthmusError):
    """Bad run-time input: wrong names, shapes or dtypes, or a prompt longer than the context."""


class TemplateError(InputError):
    """A model's chat template failed on a conversation or broke a sandbox limit (time, size, recursion)."""


class NpuError(IsthmusError):
    """An NPU program breaks a machine rule (capacity, bounds, alignment, dtype, deadlock) or does not assemble."""


class NpuDecodeError(NpuError):
    """An NPU binary (a program file or one instruction word) is malformed."""


# -- the simulated TEE (runtime/tee/) -------------------------------------------------------------

class SealError(IsthmusError):
    """A sealed package (.isth) or sealed blob is malformed, truncated, tampered with or opened with the wrong key."""


class AttestationError(IsthmusError):
    """An attestation report is malformed, its signature does not verify, or it does not meet a policy."""


class KeyReleaseError(IsthmusError):
    """The key release service refuses to release a data key (each refusal below has its own type)."""


class ChainError(AttestationError, KeyReleaseError):
    """The report's certificate chain is broken or does not end at the pinned simulated root."""


class StaleReportError(KeyReleaseError):
    """The report's timestamp is outside the freshness window."""


class ReplayError(KeyReleaseError):
    """The report's nonce has been used before (nonces are single-use)."""


class DebugReportError(KeyReleaseError):
    """The report comes from an enclave running in debug mode."""


class MeasurementError(KeyReleaseError):
    """The report's PCRs are not in the allow-list for the (tenant, model)."""


class RollbackError(KeyReleaseError):
    """The package's version is older than the rollback counter for its (tenant, model)."""


class TenantMismatchError(KeyReleaseError):
    """A report bound to one tenant asks for another tenant's key."""
