"""The vault: where crashes from every node are kept (blob store) and found (catalog)."""
