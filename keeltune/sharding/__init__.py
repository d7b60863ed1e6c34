"""Backends that spread a model over ranks, behind one small interface (``base.Backend``); ``backends`` picks one.

This package's ``__init__`` imports nothing, so torch-free parts (``plan``) stay importable on a login node.
"""
