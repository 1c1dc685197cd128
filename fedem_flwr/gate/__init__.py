"""Evaluation gate: whether a pushed adapter version is accepted (no Flower, no registry)."""

from fedem_flwr.gate.acceptance import Decision, decide

__all__ = ["Decision", "decide"]
