"""The crash path: the kernel-invoked handler and the pieces it is made of.

Imports here stay cheap (stdlib and zstandard): this package runs once per crash while
the crashed process waits. Nothing in it talks to the network, the catalog or the API
server.
"""
