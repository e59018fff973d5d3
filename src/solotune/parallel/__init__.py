"""Several processes: torchrun, data parallelism, FSDP2 sharding."""
