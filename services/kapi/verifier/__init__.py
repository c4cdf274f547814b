"""The verifier: requirement checks, test-based and formal, on the very artifact that is served."""
