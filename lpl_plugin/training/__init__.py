"""The training-loop side: the LPL loss hook, the hook registry, third-party hooks, ranks and diffusion algebra."""
