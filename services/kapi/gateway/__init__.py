"""The gateway: one OIP front door that routes each request to a backend that serves its model."""
