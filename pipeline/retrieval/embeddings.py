"""Two ways to turn passages and questions into vectors whose cosine similarity ranks passages, compared by
bench/rag.py on the built-in story questions:

- "tfidf": sparse TF-IDF vectors (scikit-learn's TfidfVectorizer, sublinear term frequencies, L2-normalised) fitted
  on the folder's passages; a question matches the passages that share its rarer words (names, objects).
- "model": the answering model's own last hidden states, mean-pooled over the real tokens, centred on the corpus
  mean (raw LM states share one dominant direction that swamps cosine similarity) and L2-normalised; searched
  with faiss (an exact inner-product index).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from pipeline.generation.padding import pad_sequences

EMBEDDINGS = ("tfidf", "model")


def model_signature(model_dir: str | Path) -> str:
    """What decides whether a model's cached passage vectors still hold: its resolved path and the size and
    modification time of each weight file (hashing the weights of a real model would take longer than a query)."""
    directory = Path(model_dir).resolve()
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    parts = [str(directory)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class TfidfEmbedding:
    """Sparse TF-IDF vectors of the passages, fitted on them; `search` ranks by cosine similarity."""

    name = "tfidf"

    def __init__(self, texts: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, lowercase=True)
        self.matrix = self.vectorizer.fit_transform(texts)  # [passages, vocabulary], rows L2-normalised

    def search(self, question: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, passage indices) of the k best passages, best first."""
        scores = (self.matrix @ self.vectorizer.transform([question]).T).toarray().ravel()
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return scores[best], best


@torch.no_grad()
def mean_pooled_states(model, tokenizer, texts: list[str], batch_size: int = 32, progress=None) -> np.ndarray:
    """float32 [len(texts), hidden] of the model's last hidden states averaged over each text's real tokens
    (texts cut to the model's context). `progress`, if given, is called with the number of texts done."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    vectors = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start: start + batch_size], add_special_tokens=False)["input_ids"]
        ids, mask = pad_sequences([e[:limit] or [tokenizer.eos_token_id] for e in encoded], tokenizer.pad_token_id,
                                  "right", device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        weights = mask.unsqueeze(-1).float()
        vectors.append(((hidden * weights).sum(1) / weights.sum(1)).cpu().numpy())
        if progress is not None:
            progress(len(encoded))
    return np.concatenate(vectors).astype(np.float32) if vectors else np.zeros((0, 0), np.float32)


class ModelEmbedding:
    """Dense vectors from the answering model (see the module docstring) in a faiss inner-product index."""

    name = "model"

    def __init__(self, model, tokenizer, vectors: np.ndarray):
        import faiss

        self.model, self.tokenizer = model, tokenizer
        self.mean = vectors.mean(0, keepdims=True)
        normalised = self.normalise(vectors)
        self.index = faiss.IndexFlatIP(normalised.shape[1])
        self.index.add(normalised)

    def normalise(self, vectors: np.ndarray) -> np.ndarray:
        centred = vectors - self.mean
        return np.ascontiguousarray(centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12),
                                    dtype=np.float32)

    def search(self, question: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, passage indices) of the k best passages, best first."""
        query = self.normalise(mean_pooled_states(self.model, self.tokenizer, [question]))
        scores, best = self.index.search(query, min(k, self.index.ntotal))
        return scores[0], best[0]
