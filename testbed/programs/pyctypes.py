# CPython reads address 0 through ctypes (SIGSEGV inside the interpreter), or aborts.
import ctypes
import os
import sys


def read_config(address):
    return ctypes.c_long.from_address(address).value


if sys.argv[1:] == ["abort"]:
    os.abort()
read_config(0)
