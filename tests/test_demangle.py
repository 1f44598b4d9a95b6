"""Readable names from linker names: real symbols of the corpus's C++ and Rust builds."""

from __future__ import annotations

import pytest

from corevault.analysis import demangle


@pytest.mark.parametrize(
    ("mangled", "readable"),
    [
        # Rust, legacy mangling: the trailing hash changes with every build
        ("_ZN9rustcrash10parse_port17h1c4edb3c80d0477fE", "rustcrash::parse_port"),
        ("_ZN4core9panicking18panic_bounds_check17haa0aa704ba684d7fE", "core::panicking::panic_bounds_check"),
        ("_ZN4core6option15Option$LT$T$GT$6unwrap17h0123456789abcdefE", "core::option::Option<T>::unwrap"),
        # Rust, v0 mangling: crate disambiguators are build hashes too
        ("_RNvCsjsgrwiHdm0p_9rustcrash10parse_port", "rustcrash::parse_port"),
        (
            "_RNCINvNtCsdyIG5SqMl5y_3std2rt10lang_startuE0CsjsgrwiHdm0p_9rustcrash.llvm.1215090575882917620",
            "std::rt::lang_start::<()>::{closure#0}",
        ),
        # C++, fully
        ("_ZSt9terminatev", "std::terminate()"),
        ("_ZN9__gnu_cxx27__verbose_terminate_handlerEv", "__gnu_cxx::__verbose_terminate_handler()"),
        (
            "_ZNSt6thread11_State_implINS_8_InvokerISt5tupleIJPFvvEEEEEE6_M_runEv",
            "std::thread::_State_impl<std::thread::_Invoker<std::tuple<void (*)()> > >::_M_run()",
        ),
    ],
)
def test_linker_names_become_the_names_people_write(mangled: str, readable: str) -> None:
    table = demangle.demangle_all([mangled, "main", "crash_here"])
    assert demangle.readable(mangled, table) == readable
    assert set(table) == {mangled}  # plain C names are left alone


def test_a_rebuild_does_not_change_a_rust_name() -> None:
    one = "_ZN9rustcrash10parse_port17h1c4edb3c80d0477fE"
    other = "_ZN9rustcrash10parse_port17hffffffffffffffffE"
    table = demangle.demangle_all([one, other])
    assert demangle.readable(one, table) == demangle.readable(other, table)


def test_names_a_program_chose_to_break_the_demangler_stay_as_they_are() -> None:
    hostile = ["_Z\n-v", "_Z" + "N1a" * 5000 + "E", "_ZZZZ"]
    table = demangle.demangle_all(hostile)
    assert all(demangle.readable(n, table) == n for n in hostile)
    assert demangle.readable("_ZN1a1bE", demangle.demangle_all(["_ZN1a1bE", *hostile])) == "a::b"


def test_type_names_of_exceptions() -> None:
    assert demangle.demangle_type("St16invalid_argument") == "std::invalid_argument"
    assert demangle.demangle_type("N3app11ConfigErrorE") == "app::ConfigError"
    assert demangle.demangle_type("-v --help") is None
    assert demangle.demangle_type("St16invalid_argument\n") is None  # one name, nothing after it
