import pytest

from fedfactory.config import Config, ConfigError, config_hash, load_config, to_toml


def test_defaults_and_preset_and_overrides():
    cfg = load_config("tiny", ["generator.steps=7", "data.alpha=0.3", "reference.centralized=false"])
    assert cfg.generator.steps == 7 and cfg.data.alpha == 0.3 and cfg.reference.centralized is False
    assert cfg.data.dataset == "digits"  # from the preset


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'generator.stepz'.*generator.steps"):
        load_config(None, ["generator.stepz=3"])


@pytest.mark.parametrize("override, pattern", [
    ("generator.steps=abc", "expected int"),
    ("generator.steps=0", "must be >= 1"),
    ("data.alpha=0", "must be > 0"),
    ("data.partition=random", "valid values are iid, pathological, dirichlet, natural"),
    ("reference.centralized=maybe", "expected bool"),
    ("synthesis.samples_per_class=-1", "must be >= 1"),
    ("generator.max_epochs=-1", "must be >= 0"),
    ("steps=3", "unknown config key"),
    ("generator.steps", "section.key=value"),
])
def test_bad_overrides_are_rejected(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_toml_round_trip(tmp_path):
    cfg = load_config("tiny", ["run.seed=5", "data.root=/x y"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = load_config(str(path))
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[generator]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match="generator.steps"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")
    assert Config().generator.family == "aegmm"
