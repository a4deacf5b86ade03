"""PPO's math on batched tensors: masked statistics, token log-probabilities, rewards and advantages, losses,
KL estimators and controllers. Pure functions of torch tensors; imports nothing but torch."""
