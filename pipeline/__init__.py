"""The machinery the four stages share, one subpackage per concern, in layers (tests/test_layers.py enforces them):

    rl → config → (data) → run, generation → train, retrieval → (reward_model), plan → ppo → evaluation → cli

A package imports only from the packages to its left; the code map in README.md says what each holds."""
