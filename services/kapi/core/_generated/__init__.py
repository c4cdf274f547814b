"""Generated protocol code: `make proto`."""
