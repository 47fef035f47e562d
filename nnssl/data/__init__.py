"""Data that ships with nnssl: the published split lists of the papers (``paper_splits/``, provenance in
``paper_splits/PROVENANCE.md``)."""
