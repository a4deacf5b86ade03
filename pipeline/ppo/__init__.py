"""PPO's models (policy and value as one module, critic, reward scorer) and its experience (rollout, scoring);
the loop itself is stages/ppo.py, the math pipeline/rl/."""
