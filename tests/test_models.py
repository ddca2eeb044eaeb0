"""A local checkpoint never reaches the network, whatever its config.json says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nsfw_safety import ModelLoadError, load_detector


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def test_local_checkpoints_load_without_the_network(eva_dir, vit_dir, no_network, tmp_path):
    for src in (eva_dir, vit_dir):  # copies: not the detector cache's entries
        det = load_detector(shutil.copytree(src, tmp_path / src.name))
        assert det.predict(torch.rand(1, 3, 32, 32)).levels.shape == (1, 4)


@pytest.mark.parametrize("architecture", [
    "hf-hub:timm/eva02_base_patch14_448.mim_in22k_ft_in22k_in1k",
    "hf_hub:timm/eva02_base_patch14_448",  # timm's old spelling of the same source
    "local-dir:/tmp/elsewhere",
    "timm/eva02_base_patch14_448",
])
def test_an_architecture_that_names_a_source_is_refused(eva_dir, tmp_path, no_network, architecture):
    model = _with_config(eva_dir, tmp_path / "ckpt", architecture=architecture)
    with pytest.raises(ModelLoadError, match="never reaches the network") as e:
        load_detector(model)
    assert repr(architecture) in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("fetching", [
    {"checkpoint_path": "/tmp/weights.pth"},  # a pickled checkpoint, loaded after the model is built
    {"pretrained_cfg_overlay": {"hf_hub_id": "timm/eva02_base_patch14_448"}},
    {"pretrained": True},
    {"cache_dir": "/tmp/cache"},
])
def test_model_args_that_fetch_weights_are_refused(eva_dir, tmp_path, no_network, fetching):
    config = json.loads((eva_dir / "config.json").read_text())
    model = _with_config(eva_dir, tmp_path / "ckpt", model_args={**config["model_args"], **fetching})
    with pytest.raises(ModelLoadError, match="loads only its own model.safetensors") as e:
        load_detector(model)
    assert next(iter(fetching)) in str(e.value)


def test_an_unknown_architecture_is_a_model_load_error(eva_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'not_a_model'"):
        load_detector(_with_config(eva_dir, tmp_path / "ckpt", architecture="not_a_model"))
