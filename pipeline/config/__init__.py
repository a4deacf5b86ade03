"""What a run config is (schema), how one is read (parsing, loading) and checked (validation)."""
