"""Data: image-caption loading, transforms and the built-in shapes data set."""
