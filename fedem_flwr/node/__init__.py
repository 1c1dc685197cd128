"""A contributor's side: its data and profile, its cache of base checkpoints (and their download from
the Hugging Face Hub), and one relay fine-tune of a leased adapter. No Flower here: the ClientApp
wires these to messages."""
