"""Network modules the nnssl trainers build from an nnU-Net plans file (dynamic-network-architectures blocks)."""
