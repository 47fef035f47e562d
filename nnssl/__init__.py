"""nnssl: semi-supervised segmentation methods inside nnU-Net v2's self-configuring pipeline."""

__version__ = "0.1.0"
