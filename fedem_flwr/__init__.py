"""fedem-flwr: community training of a multilingual Mamba model on Flower."""

__version__ = "0.1.0"
