"""Generated protocol code; regenerate with `make proto`."""
