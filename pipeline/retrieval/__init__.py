"""Answers from a folder of documents: passages (documents.py), their vectors (embeddings.py), a cached index
(index.py), and prompts that hold the best passages (prompts.py). `rlhf generate/chat --docs DIR` uses them."""
