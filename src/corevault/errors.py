"""The failures a user can cause or fix, as one family the command line turns into one line.

Each carries a message that says what went wrong and what to do; a traceback is for bugs.
Kept free of imports so that the command line can catch them without loading the modules
that raise them.
"""


class UserError(Exception):
    """A failure with a message for people: an unreachable store, an unreadable core, …"""


class NotFound(UserError):
    """No crash, report or binary with that id."""


class BadInput(UserError):
    """Input the command cannot take as written (a filter, a flag's value, a search text): exit 2."""
