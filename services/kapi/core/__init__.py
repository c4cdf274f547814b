"""What every kapi service shares: settings, errors, logging, tensors, metrics, protocol code."""
