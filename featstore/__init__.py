"""featstore: a batch feature store for CLIP embeddings.

Library entry points (each module has one): ``encode.encode``, ``labels.build_labels``,
``query.query_split`` / ``query.query_images``, ``probe.probe``, ``store.Store``.
"""

__version__ = "0.1.0"
