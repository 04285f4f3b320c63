"""Rendering: terminal tables, progress bars, HTML. Renders result objects; computes no figures."""
