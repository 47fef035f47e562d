"""Semi-supervised losses: small pure torch functions, each with its formula and source in the docstring."""
