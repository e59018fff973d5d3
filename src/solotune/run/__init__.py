"""One `solotune train` run end to end: the run, its evaluation, generations, metrics, trackers, export."""
