"""Experiment configurations (ml_collections ConfigDicts); only experiments read them."""
