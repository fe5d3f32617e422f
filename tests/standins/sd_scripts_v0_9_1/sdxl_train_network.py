"""Stand-in of sd-scripts v0.9.1 sdxl_train_network.py (tests only)."""

from library import train_util  # the checkout's own code first, as sd-scripts imports library.device_utils first

import standin_host as host
import train_network


class SdxlNetworkTrainer(host.SdxlTrainerMixin, train_network.NetworkTrainer):
    """v0.9.1's NetworkTrainer (the loss inline in train) with SDXL's latent scale and models."""


def setup_parser():
    return host.with_sdxl_arguments(train_network.setup_parser())


if __name__ == "__main__":
    host.run_sdxl_network_script(setup_parser(), train_util, SdxlNetworkTrainer)
