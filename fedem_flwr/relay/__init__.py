"""Continuous relay fine-tuning: leases (timed, fenced locks), node-selection policies and the adapter
pool (pure logic: no Flower, no torch), the coordinator that judges pushes, the keeper of the base
lineage between relay turns, and the relay Strategy (the one module here that imports Flower)."""
