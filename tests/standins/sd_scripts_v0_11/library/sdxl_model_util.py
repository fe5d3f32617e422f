"""Stand-in of sd-scripts v0.11 library/sdxl_model_util.py (tests only)."""

VAE_SCALE_FACTOR = 0.13025
MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0"
