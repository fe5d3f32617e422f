"""Stand-in of sd-scripts v0.11 train_network.py: NetworkTrainer with the real method signatures (tests only)."""

import argparse

import library.args as args_util
import library.loss as loss_util
import standin_host as host


class NetworkTrainer(host.ProcessBatchTrainer):
    """process_batch / post_process_loss / train as in standin_host (v0.10.1's), with the helpers of library.loss."""

    loss_helpers = loss_util

    def generate_step_logs(self, args: argparse.Namespace, current_loss, avr_loss, lr_scheduler, lr_descriptions,
                           optimizer=None, keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None):
        return host.step_logs(current_loss, avr_loss, lr_scheduler)


def setup_parser() -> argparse.ArgumentParser:
    return host.network_parser(args_util)
