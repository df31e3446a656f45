"""Datasets every stage reads: the embedded sets and ImageNet-layout folders, as labelled images (torch-free)."""
