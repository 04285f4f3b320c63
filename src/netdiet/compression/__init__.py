"""Compression techniques behind one interface (see base.py), recipes and the .ndz archive."""
