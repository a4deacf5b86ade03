"""Sampling from a policy and reading its log-likelihoods: decoding, padding and positions, scoring forwards."""
