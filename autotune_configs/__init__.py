"""Data package: per-device launch tables, ``<op>/device_name=<NAME>[,dtype=<dt>].json``."""
