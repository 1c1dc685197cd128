"""Everything that judges: the loss of a model on held-out blocks, the hub's blind workbench, and the
acceptance rules for an adapter push and for a new base version (the rules import no torch)."""
