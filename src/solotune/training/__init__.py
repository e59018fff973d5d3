"""The steps: the model's set-up, compile, the loop, one step, the optimizer, checkpoints."""
