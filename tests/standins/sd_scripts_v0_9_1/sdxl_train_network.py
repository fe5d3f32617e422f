"""Stand-in of sd-scripts v0.9.1 sdxl_train_network.py (tests only)."""

import train_network
from library import sdxl_model_util, sdxl_train_util, train_util


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    def __init__(self):
        super().__init__()
        self.vae_scale_factor = sdxl_model_util.VAE_SCALE_FACTOR
        self.is_sdxl = True

    def load_target_model(self, args, weight_dtype, accelerator):
        _, text_encoder1, text_encoder2, vae, unet, _, _ = sdxl_train_util.load_target_model(
            args, accelerator, sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, weight_dtype)
        return sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, [text_encoder1, text_encoder2], vae, unet


def setup_parser():
    parser = train_network.setup_parser()
    sdxl_train_util.add_sdxl_training_arguments(parser)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    args = train_util.read_config_from_file(args, parser)
    trainer = SdxlNetworkTrainer()
    trainer.train(args)
