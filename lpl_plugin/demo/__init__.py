"""`lpl-plugin demo`: a tiny SDXL-shaped model trained with and without LPL on generated images, on any machine."""
