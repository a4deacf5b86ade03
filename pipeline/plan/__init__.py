"""`rlhf plan`: each stage's memory predicted from the config and the model's shape, before anything runs."""
