"""Datasets: the prepared-split store, input pipelines, download and preparation."""
