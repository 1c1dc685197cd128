"""A Flower app that times relay hops and node loss through a real SuperLink (benchmarks/deploy.py)."""
