"""Stand-in of sd-scripts v0.10.1 train_network.py: NetworkTrainer with the real method signatures (tests only)."""

import argparse

import library.train_util as train_util
import standin_host as host


class NetworkTrainer(host.ProcessBatchTrainer):
    """process_batch / post_process_loss / train as in standin_host, with the loss helpers of train_util."""

    loss_helpers = train_util

    def generate_step_logs(self, args: argparse.Namespace, current_loss, avr_loss, lr_scheduler, lr_descriptions,
                           optimizer=None, keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None,
                           mean_combined_norm=None):
        return host.step_logs(current_loss, avr_loss, lr_scheduler)


def setup_parser() -> argparse.ArgumentParser:
    return host.network_parser(train_util)


if __name__ == "__main__":  # the SD 1.x LoRA trainer: here it reads its settings and reports them (no training)
    parser = setup_parser()
    args = train_util.read_config_from_file(parser.parse_args(), parser)
    print(f"train_network.py read its settings: use_lpl={getattr(args, 'use_lpl', None)!r}")
