"""Offline pseudo-labeling: predict unlabeled cases, select them, build a new nnU-Net dataset."""
