"""Host-trainer adapters (one module group per host) and what serves the host: activation, launcher, GUI lines."""
