"""Vote-weighted attention: the dense float64-able reference (the oracle for every kernel)."""
