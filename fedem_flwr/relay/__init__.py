"""Continuous relay fine-tuning: leases and node-selection policies (pure logic).

Import-light on purpose: the relay Strategy (which imports Flower) lives in ``fedem_flwr.relay.strategy``
and is imported from there, never from here.
"""

from fedem_flwr.relay.leases import (
    REJECT_REASONS,
    AdapterBusy,
    Lease,
    LeaseBook,
    LeaseError,
    LeaseNotActive,
    NodeBusy,
    PushRejected,
    SweepSchedule,
)
from fedem_flwr.relay.policies import AdapterInfo, NodeProfile, Policy, make_policy
from fedem_flwr.relay.pool import AdapterPool, FreeAdapters

__all__ = [
    "REJECT_REASONS",
    "AdapterBusy",
    "AdapterInfo",
    "AdapterPool",
    "Lease",
    "FreeAdapters",
    "LeaseBook",
    "LeaseError",
    "LeaseNotActive",
    "NodeBusy",
    "NodeProfile",
    "Policy",
    "PushRejected",
    "SweepSchedule",
    "make_policy",
]
