"""solotune: fine-tune a causal LM on one GPU and measure what each technique costs and buys."""

__version__ = "0.1.0"
