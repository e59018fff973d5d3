"""The process's C memory allocator: glibc's malloc, or jemalloc / tcmalloc where installed.

On the CPU every tensor comes from the C library's malloc. glibc serves the activation-sized
blocks (1-32 MiB) from its heap, and the heap keeps the holes that short-lived temporaries leave
between tensors that live until backward: in the eager loop about a gigabyte of the peak RSS is
such holes (benchmarks/cpu_heap.py). tcmalloc and jemalloc keep blocks of each size class
apart and hand freed pages back: they cut the peak RSS of the same run by a quarter, tcmalloc
at no cost in speed (`benchmarks/vs_trl.py --focus allocators`). Both are system libraries
(Debian/Ubuntu: `apt install libtcmalloc-minimal4` or `libjemalloc2`), not Python packages.

A process picks its allocator before it starts, so the `solotune` command re-executes itself
once, with LD_PRELOAD naming the library, before it imports torch (`reexec_with`). Which
allocator a process really runs is read from its own memory map (`in_use`), not assumed.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from solotune.errors import SolotuneError

# --cpu-allocator value -> the library's name for ctypes.util.find_library
LIBRARIES = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}  # auto tries them in this order
REEXEC_MARK = "SOLOTUNE_CPU_ALLOCATOR"  # set in the re-executed process: never re-execute twice
INSTALL_HINT = {"jemalloc": "apt install libjemalloc2", "tcmalloc": "apt install libtcmalloc-minimal4"}


def find_library(name: str) -> str | None:
    """The shared library of allocator `name` on this system, or None."""
    return ctypes.util.find_library(LIBRARIES[name])


def choose(requested: str, find=None) -> tuple[str, str | None]:
    """(allocator, library to preload or None) for `--cpu-allocator requested`.

    auto: tcmalloc if installed (it measured fastest), else jemalloc, else glibc. A named allocator that is
    not installed is an error, not a silent fallback. `find`: name -> library (find_library).
    """
    find = find or find_library
    if requested == "glibc":
        return "glibc", None
    if requested == "auto":
        for name in LIBRARIES:
            library = find(name)
            if library:
                return name, library
        return "glibc", None
    library = find(requested)
    if not library:
        raise SolotuneError(
            f"--cpu-allocator {requested}: lib{LIBRARIES[requested]} is not installed on this system "
            f"(Debian/Ubuntu: {INSTALL_HINT[requested]}); or use --cpu-allocator glibc"
        )
    return requested, library


def in_use() -> str:
    """The allocator this process runs, from the libraries mapped into it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: the platform's own malloc
        return "system"
    for name, library in LIBRARIES.items():
        if f"lib{library}" in maps:
            return name
    return "glibc"


def reexec_with(requested: str, argv: list[str]) -> None:
    """Re-execute this command with the requested allocator preloaded, unless it already runs it.

    Returns when there is nothing to change (glibc asked for, nothing found for auto, the
    allocator already loaded, or this is the re-executed process); otherwise does not return.
    """
    if os.environ.get(REEXEC_MARK) or sys.platform != "linux":
        return
    name, library = choose(requested)
    if library is None or in_use() == name:
        return
    env = dict(os.environ, **{REEXEC_MARK: name})
    env["LD_PRELOAD"] = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "solotune.cli", *argv], env)


def describe(requested: str) -> str:
    """One line for the run's header: what this process runs, and why."""
    running = in_use()
    if running == requested:
        return f"cpu allocator: {running} (--cpu-allocator {requested})"
    if requested == "auto" and running != "glibc":
        return f"cpu allocator: {running} (auto: installed here)"
    if requested == "auto" and choose("auto")[0] == "glibc":
        return (
            "cpu allocator: glibc (auto: neither tcmalloc nor jemalloc is installed; "
            "`apt install libtcmalloc-minimal4` lowers the CPU peak)"
        )
    return f"cpu allocator: {running} (--cpu-allocator {requested} takes effect when the solotune command starts the process)"
