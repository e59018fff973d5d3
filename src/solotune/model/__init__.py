"""What is trained, in which dtype: loading, LoRA adapters, quantization, the precision policy."""
