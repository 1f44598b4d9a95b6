"""The ``corevault`` command line: one module per group of commands, errors mapped in one place."""
