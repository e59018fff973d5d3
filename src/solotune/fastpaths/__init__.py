"""The loop's fast paths, each checked against the model's plain forward (selfcheck)."""
