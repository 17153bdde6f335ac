"""Commands beside the main job: the throughput benchmark of the train step, the ArrayRecord helper for reading a
dataset from disk, and the tables of a factor study from finished evaluations."""
