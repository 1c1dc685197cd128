"""The LoRA fine-tuning loop (a contributor's side) and continuous pretraining (the hub's); tensors
in, numbers out: no Flower, no registry, and neither loop imports `datasets`, so a GPU machine trains
on blocks it is handed without carrying them."""
