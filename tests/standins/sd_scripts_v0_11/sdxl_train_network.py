"""Stand-in of sd-scripts v0.11 sdxl_train_network.py (tests only)."""

import library.args as args_util
import standin_host as host
import train_network


class SdxlNetworkTrainer(host.SdxlTrainerMixin, train_network.NetworkTrainer):
    """v0.11's NetworkTrainer (process_batch, library.loss's helpers) with SDXL's latent scale and models."""


def setup_parser():
    return host.with_sdxl_arguments(train_network.setup_parser())


if __name__ == "__main__":
    host.run_sdxl_network_script(setup_parser(), args_util, SdxlNetworkTrainer)
