"""corevault: capture, keep and explain core dumps of crashing processes in pods and on hosts.

The package reads like a crash's path: :mod:`corevault.capture` runs in the crash path
(one process per crash, stdlib and zstandard only); :mod:`corevault.spool` is where its
entries wait for the agent; :mod:`corevault.pattern`, :mod:`corevault.config` and
:mod:`corevault.podindex` are shared by every stage; :mod:`corevault.hostsetup` installs
the handler on a host; :mod:`corevault.cli` is the command line over all of it.
"""

__version__ = "0.1.0"
