"""Measurement: peak memory and its breakdown, FLOPs and MFU, the CPU allocator."""
