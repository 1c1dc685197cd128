"""How a base version comes to be: merging accepted adapters into it (exact arithmetic on their
deltas, and which adapters a merge absorbs) and the keyed held-out data every version is judged on."""
