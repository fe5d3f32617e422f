"""Stand-in of the v0.11 library/args.py (upstream PR #2337): argument helpers moved out of train_util (tests only)."""

import argparse

import standin_host as host


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser):
    return host.read_config(args, parser)


def add_training_arguments(parser: argparse.ArgumentParser, support_dreambooth: bool):
    host.add_common_arguments(parser)
