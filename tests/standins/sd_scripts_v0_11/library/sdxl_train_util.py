"""Stand-in of sd-scripts v0.11 library/sdxl_train_util.py: real signatures, tiny bodies (tests only)."""

import argparse
import importlib

import standin_host as host


def load_target_model(args, accelerator, model_version: str, weight_dtype):
    return host.load_models(args, accelerator, weight_dtype)


def add_sdxl_training_arguments(parser: argparse.ArgumentParser, support_text_encoder_caching: bool = True):
    host.add_sdxl_arguments(parser)


def sample_images(*args, **kwargs):
    return importlib.import_module("library.train_util").sample_images_common(None, *args, **kwargs)
