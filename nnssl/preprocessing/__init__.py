"""Preprocessing of unlabeled cases with the dataset's own nnU-Net plans."""
