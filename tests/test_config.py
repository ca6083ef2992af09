from pathlib import Path

import pytest

from p5ray import config
from p5ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_file_is_generated_from_the_dataclasses():
    written = (ROOT / "p5ray" / "configs" / "default.yaml").read_text()
    assert written == config.render_defaults(), "run `python -m p5ray.config` to regenerate"


def test_default_yaml_loads_to_the_defaults():
    assert load_config(ROOT / "p5ray" / "configs" / "default.yaml") == config.Config()


def test_spec_keys_exist():
    cfg = load_config()
    for key in ("train.epochs", "train.lr", "train.batch_size", "train.seed", "model.dim", "model.layers",
                "model.max_len", "loss.alpha.recall", "loss.alpha.rank", "loss.alpha.cross_sell", "loss.alpha.rating"):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node is not None


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=0.01", "loss.alpha.rank=1", "model.mixture=mmoe", "eval.ks=[1, 3]"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.loss.alpha.rank, float)
    assert cfg.model.mixture == "mmoe" and cfg.eval.ks == (1, 3)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.nope=1", "train.nope"),
        ("nosection.x=1", "nosection"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=abc", "train.epochs"),
        ("model.mixture=moe", "model.mixture"),
        ("train.use_gpu=1", "train.use_gpu"),
        ("loss.alpha.recall=high", "loss.alpha.recall"),
        ("trainepochs", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "model.dim=32"])
    path = tmp_path / "c.yaml"
    config.save_config(cfg, path)
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
