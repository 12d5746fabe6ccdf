from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_demo_recipe():
    assert load_config() == load_config(REPO / "configs/recipes/landsat_mae.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path):
    import yaml

    dataset = (yaml.safe_load(path.read_text()).get("data") or {}).get("dataset")
    given = [f"data.options.root={tmp_path}"] if dataset in ("folder", "imagefolder") else []  # the user's folder
    assert isinstance(load_config(path, given), Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["pretrain.epochs=3", "pretrain.objective.mask_ratio=0.6", "run.quiet=true",
                             "data.options.pool_stride=4"])
    assert cfg.pretrain.epochs == 3 and cfg.pretrain.objective.mask_ratio == 0.6 and cfg.run.quiet is True
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
        load_config(None, ["pretrain.objective.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="patch_size=5 does not divide img_size=16"):
        load_config(None, ["model.img_size=16", "model.patch_size=5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["pretrain.epochs"])


def test_flat_keys_cover_every_section():
    flat = load_config().flat()
    assert flat["pretrain.objective.mask_ratio"] == 0.75 and flat["pretrain.objective.name"] == "mae"
    assert {k.split(".")[0] for k in flat} == set(Config.model_fields)


def test_each_objective_has_its_own_section_and_its_own_unknown_keys():
    cfg = load_config(None, ["pretrain.objective=simmim", "pretrain.objective.mask_patch_size=4"])
    assert cfg.pretrain.objective.name == "simmim" and cfg.pretrain.objective.mask_patch_size == 4
    with pytest.raises(ConfigError, match=r"pretrain\.objective\.decoder_dim: unknown key for objective 'simmim'"):
        load_config(None, ["pretrain.objective.name=simmim", "pretrain.objective.decoder_dim=32"])
    with pytest.raises(ConfigError, match=r"unknown objective 'nope'; known: \['beit', 'mae', 'simmim'"):
        load_config(None, ["pretrain.objective=nope"])


def test_a_recipe_names_an_objective_and_overrides_add_its_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {backbone: swin_debug, patch_size: 2}\npretrain: {objective: simmim}\n")
    cfg = load_config(path, ["pretrain.objective.mask_ratio=0.5"])
    assert cfg.pretrain.objective.name == "simmim" and cfg.pretrain.objective.mask_ratio == 0.5


def test_an_unsupported_objective_backbone_pair_fails_at_load_naming_both():
    with pytest.raises(ConfigError, match=r"objective 'mae' cannot pretrain backbone 'swin_debug' \(family 'swin'\)"):
        load_config(None, ["model.backbone=swin_debug", "model.img_size=16", "model.patch_size=2"])
    # the same backbone is fine when nothing is pretrained
    assert load_config(None, ["model.backbone=swin_debug", "finetune.init=scratch"]).model.backbone == "swin_debug"


def test_unknown_backbones_and_geometries_fail_at_load_with_the_reason():
    with pytest.raises(ConfigError, match=r"model\.backbone: unknown backbone 'vit_hueg'; known: \["):
        load_config(None, ["model.backbone=vit_hueg"])
    with pytest.raises(ConfigError, match=r"model\.window_size=4: backbone 'vit_debug' \(vit\) has no windows"):
        load_config(None, ["model.backbone=vit_debug", "model.window_size=4", "model.img_size=16", "model.patch_size=4"])
    with pytest.raises(ConfigError, match=r"mask_patch_size=6 must be a multiple of model.patch_size=2"):
        load_config(None, ["model.backbone=swin_debug", "pretrain.objective=simmim", "model.img_size=16",
                           "model.patch_size=2", "pretrain.objective.mask_patch_size=6"])
    with pytest.raises(ConfigError, match=r"img_size=16 must be a multiple of the encoder's output stride 32"):
        load_config(None, ["model.backbone=swin_tiny", "model.img_size=16", "model.patch_size=4",
                           "pretrain.objective=simmim", "pretrain.objective.mask_patch_size=8"])


def test_the_probe_starts_from_maes_linear_probe_optimizer():
    probe = load_config(None, ["finetune.mode=probe", "finetune.optimizer.base_lr=0.05"]).finetune.optimizer
    assert (probe.name, probe.base_lr, probe.weight_decay, probe.layer_decay) == ("lars", 0.05, 0.0, None)
    full = load_config(None).finetune.optimizer
    assert (full.name, full.layer_decay, full.betas) == ("adamw", 0.75, (0.9, 0.999))


def test_override_errors_are_not_headed_defaults():
    with pytest.raises(ConfigError, match="^invalid overrides:"):
        load_config(None, ["pretrain.epochs=0"])


def test_resume_safe_keys_are_declared_by_the_config_itself():
    from pipeline.config import resume_safe_keys

    safe = resume_safe_keys()
    assert {"run.quiet", "run.num_workers", "data.root", "tracking", "pretrain.log_every_steps"} <= safe
    assert not {"run.seed", "pretrain.objective", "model.backbone", "finetune.optimizer"} & safe


def test_beit_fine_tuning_starts_from_beits_recipe_under_the_recipes_own_keys():
    beit = load_config(None, ["pretrain.objective=beit", "model.backbone=beit_debug"])
    assert beit.finetune.optimizer.layer_decay == 0.65 and beit.finetune.optimizer.betas == (0.9, 0.999)
    own = load_config(None, ["pretrain.objective=beit", "model.backbone=beit_debug", "finetune.optimizer.layer_decay=0.9"])
    assert own.finetune.optimizer.layer_decay == 0.9 and own.finetune.optimizer.weight_decay == 0.05
    assert load_config(None, []).finetune.optimizer.layer_decay == 0.75  # MAE's stays
    probe = load_config(None, ["pretrain.objective=beit", "model.backbone=beit_debug", "finetune.mode=probe"])
    assert probe.finetune.optimizer.name == "lars" and probe.finetune.optimizer.layer_decay is None


@pytest.mark.parametrize("override,message", [
    ("tokenizer.encoder=swin_debug", "tokenizer.encoder: 'swin_debug' is not a ViT variant"),
    ("tokenizer.encoder=vit_nope", "tokenizer.encoder: unknown backbone 'vit_nope'"),
    ("tokenizer.teacher_backbone=resnet_debug", "tokenizer.teacher_backbone: 'resnet_debug' has no patch features"),
    ("tokenizer.kind=dall_e", r"tokenizer\.kind: Input should be 'vqkd' or 'vqvae'"),
    ("tokenizer.codebok_size=3", r"tokenizer\.codebok_size: unknown key"),
])
def test_tokenizer_section_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["pretrain.objective=beit", "model.backbone=beit_debug", override])


def test_beit_refuses_a_hierarchical_backbone_and_an_empty_mask():
    with pytest.raises(ConfigError, match="objective 'beit' cannot pretrain backbone 'swin_debug'"):
        load_config(None, ["pretrain.objective=beit", "model.backbone=swin_debug"])
    with pytest.raises(ConfigError, match="mask_ratio=0.01 masks no patch of the 4 x 4 patch grid"):
        load_config(None, ["pretrain.objective=beit", "model.backbone=beit_debug", "model.img_size=16",
                           "model.patch_size=4", "pretrain.objective.mask_ratio=0.01"])


def test_switching_objective_by_override_drops_the_recipes_keys_of_the_other_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pretrain: {objective: {name: mae, decoder_dim: 16}}\n"
                      "finetune: {optimizer: {name: adamw, base_lr: 0.01}}\n")
    cfg = load_config(recipe, ["pretrain.objective=beit", "pretrain.objective.tokenizer=/some/tokenizer",
                               "finetune.optimizer.name=sgd"])
    assert cfg.pretrain.objective.name == "beit" and cfg.pretrain.objective.tokenizer == "/some/tokenizer"
    assert cfg.finetune.optimizer.base_lr == 0.01  # other tagged-by-name sections still merge
    same = load_config(recipe, ["pretrain.objective.mask_ratio=0.5"])
    assert same.pretrain.objective.decoder_dim == 16 and same.pretrain.objective.mask_ratio == 0.5


def test_changed_keys_are_those_off_their_own_defaults():
    """What sweep trials are fingerprinted on: a key at its default (one added in a later version)
    does not count; nested defaults are the parent's (tokenizer.optimizer is not pretrain.optimizer)."""
    from pipeline.config import changed_keys

    base = changed_keys(load_config(None, ["model.img_size=16", "model.patch_size=4"]))
    assert base == changed_keys(load_config(None, ["model.img_size=16", "model.patch_size=4",
                                                    "finetune.drop_path=0.1", "tokenizer.optimizer.base_lr=0.001"]))
    assert "tokenizer.optimizer.base_lr" not in base and base["pretrain.objective.name"] == "mae"
    changed = changed_keys(load_config(None, ["model.img_size=16", "model.patch_size=4", "finetune.drop_path=0.2",
                                              "pretrain.objective=simmim"]))
    assert changed["finetune.drop_path"] == 0.2 and changed["pretrain.objective.name"] == "simmim"


def test_one_tokenizer_optimizer_key_keeps_the_tokenizers_other_defaults():
    opt = load_config(None, ["tokenizer.optimizer.base_lr=0.002"]).tokenizer.optimizer
    assert (opt.base_lr, opt.weight_decay, opt.betas, opt.warmup_epochs) == (0.002, 1e-4, (0.9, 0.99), 1)
