"""Commands beside the main job: the throughput benchmark of the train step and the ArrayRecord helper for reading a
dataset from disk."""
