"""Evaluation at scale, one module per task with one entry function (CLIP_benchmark's shape):

- ``zeroshot.zeroshot``: zero-shot classification of a stored split, streamed (``featstore query --split``);
- ``fewshot.fewshot``: few-shot linear probes, K examples per class over several seeds (``probe --shots``);
- ``report.report``: an HTML page with plots and CLIP_benchmark-style JSON results (``featstore report``).
"""
