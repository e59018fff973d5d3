"""The one error type that solotune raises for anything the user can fix, and the exit codes."""

USER_ERROR_EXIT = 2
OUT_OF_MEMORY_EXIT = 3  # a run that ran out of memory; `solotune ablate` marks its cell X (OOM)


class SolotuneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The CLI prints the message alone (no traceback) and exits with status 2.
    """


class RunStopped(SolotuneError):
    """The run was asked to stop (SIGINT / SIGTERM) and saved a checkpoint to resume from."""

    exit_code = 130


def is_out_of_memory(e: BaseException) -> bool:
    """True for the ways PyTorch and Python report a failed allocation (torch.OutOfMemoryError by
    its name: this module is imported where torch need not be)."""
    text = str(e).lower()
    return (
        isinstance(e, MemoryError)
        or any(cls.__name__ == "OutOfMemoryError" for cls in type(e).__mro__)
        or "out of memory" in text
        or "can't allocate memory" in text
    )
