from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_demo_recipe():
    assert load_config() == load_config(REPO / "configs/recipes/landsat_mae.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["pretrain.epochs=3", "pretrain.mask_ratio=0.6", "run.quiet=true",
                             "data.options.pool_stride=4"])
    assert cfg.pretrain.epochs == 3 and cfg.pretrain.mask_ratio == 0.6 and cfg.run.quiet is True
    assert cfg.data.options["pool_stride"] == 4


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"pretrain\.epochz: unknown key"):
        load_config(None, ["pretrain.epochz=3"])


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("finetune:\n  label_fraction: lots\n")
    with pytest.raises(ConfigError, match=r"finetune\.label_fraction") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_out_of_range_and_inconsistent_values_fail():
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(None, ["pretrain.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="patch_size=5 does not divide img_size=16"):
        load_config(None, ["model.patch_size=5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["pretrain.epochs"])


def test_flat_keys_cover_every_section():
    flat = load_config().flat()
    assert flat["pretrain.mask_ratio"] == 0.75
    assert {k.split(".")[0] for k in flat} == set(Config.model_fields)
