"""Retrieval figures (PR curve, precision@k, precision within radius, retrieval grid) from codes.

The figures live in :mod:`.figures` (imports matplotlib with the Agg backend).
"""
