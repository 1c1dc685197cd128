"""Typed errors a user can act on; each message names the offending key and value."""

import sqlite3


class FedemError(Exception):
    """Base class of every error fedem-flwr raises on purpose."""


class ConfigError(FedemError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class ModelNotFound(FedemError):
    """A model name, folder or repo id does not resolve to a model."""


class UnsafeLoraTarget(ConfigError):
    """A LoRA target would be bypassed or refused on some execution path."""


class InvalidAdapter(FedemError, ValueError):
    """A received or stored adapter fails validation (keys, shapes, dtypes, values, size)."""


class DataError(FedemError):
    """A corpus or data file is missing, malformed or too small."""


class HubError(FedemError):
    """The hub's state folder or registry cannot be used as asked."""


class HubFault(FedemError):
    """The hub itself cannot go on (registry not writable, store unreadable); the run stops, naming why."""


class HubNotFound(HubError):
    """No hub state at the chosen folder (pass --hub DIR or set FEDEM_HUB)."""


class HubLocked(HubError):
    """Another process holds the hub's writer lock; the message names it."""


class SchemaTooNew(HubError):
    """The registry was written by a newer fedem-flwr than this one."""


class RegistryConflict(HubError, ValueError):
    """A registry write contradicts a recorded row (second active lease, version clash)."""


class KernelsUnavailable(ConfigError):
    """`model.kernels` is `require` but the fused mamba-ssm / causal-conv1d kernels cannot run here."""


class FlowerProcessError(FedemError):
    """A SuperLink, SuperNode or `flwr` command we started failed or did not get ready."""


class RunFailed(FedemError):
    """A Flower run ended in a status other than `finished:completed` (or timed out)."""


class StoreError(FedemError):
    """An artifact store cannot read or write a revision as asked."""


class DigestMismatch(StoreError):
    """An artifact's bytes do not hash to its recorded digest; the message names the files."""


class RevisionNotFound(StoreError):
    """A repo or revision is not in the artifact store; the message names both."""


class RevisionExists(StoreError):
    """A revision is already stored with other content; revisions are never overwritten."""


class HubUnreachable(StoreError):
    """The Hugging Face Hub endpoint (named) did not answer after retries, or offline mode forbids it."""


class TrainingError(FedemError):
    """Training cannot go on: no trainable parameters, a non-finite loss, or no memory at micro-batch 1."""


class BaseUnavailable(FedemError):
    """A train message names a base checkpoint the node neither has cached nor was sent."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, bounded: what a recorded reason or a fault's cause shows."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_hub_fault(err: BaseException) -> bool:
    """Faults of the hub itself (registry not writable, store unusable), which stop the run; anything
    else concerns one reply and is contained. A row or revision that contradicts another is one push's
    trouble: that push is rejected and the hub works on."""
    if isinstance(err, HubFault):
        return True
    if isinstance(err, (sqlite3.IntegrityError, RegistryConflict, RevisionExists)):
        return False
    return isinstance(err, (sqlite3.DatabaseError, HubError, StoreError))
