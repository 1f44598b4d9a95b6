"""The node agent: ships the spool into the vault, analyses, keeps retention, exports metrics."""
