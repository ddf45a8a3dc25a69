"""Evaluation: speculative decoding against the target alone, and what it measures.

``verify`` (lossless verification), ``decode`` / ``batch_decode`` (single and batched rounds
over ``target`` / ``ragged_target``), ``policies`` / ``scheduler`` / ``calibration`` (how much
of a block to verify; docs/DESIGN.md §4), ``simulator`` (replayed rounds), ``metrics`` /
``plots`` / ``report`` (what ``results.json`` and the report hold), ``runner`` / ``settings``
(``eval.py``'s workers and options). Import the module you need; this package imports
nothing, so the torch-free modules (``settings``, ``report``'s argument checks) start fast.
"""
