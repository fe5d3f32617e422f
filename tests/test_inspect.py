"""`lpl-plugin inspect`: the picture of what LPL compares, with the built-in tiny VAE and a saved VAE folder."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL  # noqa: F401  (imported before capsys, so diffusers' log handler is the real stderr)
from PIL import Image

from lpl_plugin import LatentPerceptualLoss, LPLConfig
from lpl_plugin.cli.main import main
from lpl_plugin.cli.inspect import layer_views, load_image
from lpl_plugin.demo.data import draw, make_scenes
from lpl_plugin.engine.outliers import outlier_mask


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A generated 64 px scene saved as PNG."""
    path = tmp_path_factory.mktemp("images") / "scene.png"
    pixels = ((draw(make_scenes(3, 0), 64)[2].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_inspect_tiny_writes_the_picture(image_path, tmp_path, capsys):
    out = tmp_path / "inspect.png"
    assert main(["inspect", "--vae", "tiny", "--image", str(image_path), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["mid", "up0", "up1", "up2", "up3"]
    assert "not masked" in lines[0] and "dropped as outliers" in lines[4] and lines[-1] == f"wrote {out}"
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > 1000 and picture.height > 400


def test_inspect_a_saved_vae_folder(image_path, tmp_path, capsys, vae):
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert not list((tmp_path / "vae").glob("*.bin"))
    out = tmp_path / "inspect.png"
    config = tmp_path / "lpl.toml"
    config.write_text("[lpl]\nuse_lpl = true\nlpl_num_blocks = 2\n")
    assert main(["inspect", "--vae", str(tmp_path / "vae"), "--image", str(image_path), "--out", str(out),
                 "--resolution", "48", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["mid", "up0", "up1"] and "24x24" in lines[2]
    assert out.stat().st_size > 10_000


def test_masks_are_the_engines_and_show_planted_outliers(image_path, vae):
    """Spike a few pixels of the decoder's up2 output (a real forward hook): the mask must drop exactly those."""
    copy = type(vae).from_config(vae.config)
    copy.load_state_dict(vae.state_dict())

    def spike(module, inputs, output):
        output = output.clone()
        output[:, :, 20:23, 30:33] = 1e4
        return output

    copy.decoder.up_blocks[2].register_forward_hook(spike)
    config = LPLConfig(use_lpl=True)
    views, _ = layer_views(copy, load_image(str(image_path), None), config)
    up2 = views[3]
    assert up2.masked and up2.dropped_percent > 0
    assert (up2.dropped[20:23, 30:33] == 1).all() and up2.dropped[:10, :10].sum() == 0
    engine = LatentPerceptualLoss(copy, config)
    latents = copy.encode(load_image(str(image_path), None)).latent_dist.mean * engine.scaling_factor
    features = engine.target_features(latents)
    for view, feature, factor in zip(views, features, engine.outlier_factors):
        expected = torch.zeros_like(view.dropped) if factor is None else 1 - outlier_mask(feature, factor).float().mean(1)[0]
        torch.testing.assert_close(view.dropped, expected)
        torch.testing.assert_close(view.energy, feature.float().pow(2).sum(1).sqrt()[0])


def test_inspect_mistakes_are_one_line(image_path, tmp_path, capsys):
    assert main(["inspect", "--vae", str(tmp_path / "missing"), "--image", str(image_path)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", "--vae", str(tmp_path / "empty"), "--image", str(image_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a diffusers VAE folder" in err[0]
    assert main(["inspect", "--vae", "tiny", "--image", str(tmp_path / "nope.png")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert main(["inspect", "--vae", "tiny", "--image", str(tmp_path / "text.png")]) == 2
    assert "not a readable image" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[lpl]\nlpl_num_blocks = 7\n")
    assert main(["inspect", "--vae", "tiny", "--image", str(image_path), "--config", str(bad)]) == 2
    assert "`lpl_num_blocks` must be between 0 and 4, got 7" in capsys.readouterr().err
