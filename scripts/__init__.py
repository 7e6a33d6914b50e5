"""Data download and preparation scripts (run them as files: ``python scripts/prepare_covid19_ct_seg.py --help``)."""
