"""solotune: fine-tune a causal LM on one GPU and measure what each technique costs and buys."""

import logging

__version__ = "0.1.0"


class _DropMessages(logging.Filter):
    """Drops log records that start with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# peft imports bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 bitsandbytes
# then logs that it could not fetch an optional inference kernel from the hub. solotune never
# uses that kernel (quant.keep_4bit_layout_trainable), so the line is noise on every command.
# Installed here, before anything can import bitsandbytes: every solotune module imports this first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))
