"""The machinery the four stages share, one subpackage per concern, in layers (tests/test_layers.py enforces them):

    rl → config → (data) → run → generation → train → (reward_model) → ppo → evaluation, plan → cli

A package imports only from packages to its left; see the code map in README.md."""
