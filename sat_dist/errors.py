"""Errors a user can hit. Each message names the file, the tensor and what to do; the agreement
step adds the failing rank(s) and re-raises the same GroupLoadError on every rank."""


class SatDistError(Exception):
    """Base class: anything sat_dist raises on purpose."""


class ConfigError(SatDistError):
    """Bad or inconsistent configuration (found before any byte is read)."""


class CheckpointError(SatDistError):
    """The checkpoint on disk is missing, malformed, unsafe, or disagrees with the model."""


class PlanError(SatDistError):
    """The read plan would not cover every local element exactly once."""


class LaunchError(SatDistError):
    """The launcher's environment is inconsistent or does not say where the rendezvous is."""


class RendezvousError(SatDistError):
    """The process group could not be formed (unreachable master, timeout)."""


class GroupLoadError(SatDistError):
    """Raised identically on every rank when any rank failed (`agreed`), or on a rank that could not
    reach its peers (`agreed` False: each survivor names the rank(s) that did not arrive)."""

    def __init__(self, message: str, failures: dict, phase: str = "", agreed: bool = True):
        super().__init__(message)
        self.failures = failures  # rank -> "ErrorType: message"
        self.phase = phase
        self.agreed = agreed


class UnsafeCheckpointError(CheckpointError):
    """A pickle names a global outside the allow-list: refused before anything is unpickled."""


class MalformedCheckpointError(CheckpointError):
    """A file's own structure is invalid (a safetensors header that is not what the format allows):
    refused while validating the header, before anything is sized by it."""


class IntegrityError(CheckpointError):
    """`--verify`: a file's bytes do not match its manifest (a flipped bit, a truncated or replaced
    file), or there is no usable manifest; names the file and the block."""


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model (a target it lacks, other shapes or layer count) or is
    not a LoRA sat_dist can merge; found from headers, before any byte of the base is read."""
