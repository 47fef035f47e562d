"""Converters from public raw downloads into nnU-Net raw format plus ssl_split.json."""
