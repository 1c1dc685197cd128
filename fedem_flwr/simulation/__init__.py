"""Simulated federations: a virtual clock, virtual contributors, the Grid that joins them to Flower's
simulation engine, and the baselines a relay is compared with."""
