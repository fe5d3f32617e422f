"""The LPL engine: layer math, the frozen decoder trunk, lean gradient passes and the engine object."""
