"""Training machinery: the stage process's entry, engines (DDP, FSDP2, DeepSpeed) and their launch, the custom
loop and the HF Trainer glue, the one final save, guards against non-finite weights, model building, batches."""
