"""Constants shared by data preparation, batching and the loss."""

# Label value of a position that is not learned (prompt tokens, padding). The loss ignores it.
CROSS_ENTROPY_IGNORE_INDEX = -100
