"""Native kernels, compiled on first use; every one has a torch fallback."""
