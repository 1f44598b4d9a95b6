"""Explaining a captured core: what crashed, where, in which thread, and which bug it is."""
