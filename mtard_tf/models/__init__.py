"""The networks: the architecture registry (students and teachers as Keras functional models) and the loading and
checking of model files."""
