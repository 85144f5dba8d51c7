"""Process memory policy for the streaming tools (conversion, benchmarks)."""


def return_freed_memory() -> None:
    """glibc raises its mmap threshold after large frees, so later layer-sized tensors come from
    the heap and stay resident after they are freed: streaming would grow to ~half the model
    (measured). A fixed 1 MiB threshold sends every large tensor back to the OS when freed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass
