"""Synthetic CLIP-like embeddings for the index tests and bench: clustered, anisotropic, not uniform noise.

Each vector is a cluster centre plus noise, both drawn with a power-law spectrum (variance ~ 1/i) in a random
orthonormal basis, plus a shared offset: random pairs have cosine ~0.5, pairs in one cluster ~0.8, as CLIP
image embeddings do. Batches are drawn from their own seeds, so a stream of any length is reproducible
without holding it: ``clip_like(n, dim)`` is re-iterable and yields ``(keys, vectors)`` batches.
"""

from __future__ import annotations

import numpy as np


class clip_like:
    """A re-iterable stream of ``(int64 keys, float32 unit vectors)`` batches; keys are ``first_key + row``."""

    def __init__(self, rows: int, dim: int, seed: int = 0, batch: int = 16384, clusters: int | None = None,
                 first_key: int = 0):
        self.rows, self.dim, self.seed, self.batch, self.first_key = rows, dim, seed, batch, first_key
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.scale = (basis / np.sqrt(np.arange(1, dim + 1))[:, None]).astype(np.float32)  # rows: scaled axes
        offset = rng.standard_normal(dim).astype(np.float32)
        self.offset = offset / np.linalg.norm(offset)
        n_clusters = clusters or max(8, rows // 500)
        centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) @ self.scale
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        for start in range(0, self.rows, self.batch):
            yield self.batch_at(start, min(self.batch, self.rows - start))

    def batch_at(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, start))
        which = rng.integers(0, len(self.centres), n)
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) @ self.scale
        noise *= 0.75 / np.linalg.norm(noise, axis=1, keepdims=True)
        x = self.centres[which] + noise + self.offset
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.arange(self.first_key + start, self.first_key + start + n, dtype=np.int64), x
