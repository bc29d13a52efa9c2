"""Training data: the built-in captioned shapes and real image-text datasets through `datasets`."""
