"""Comparing policies after a run: SFT vs PPO vs best-of-N on held-out prompts, the report and its charts."""
