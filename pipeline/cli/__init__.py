"""The `rlhf` command (run, plan, status, compare, generate, chat) and the GGUF conversion tool."""
