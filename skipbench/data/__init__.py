"""Datasets and prompt formatting."""
