import pytest

from common import config as C


def test_load_and_override(tmp_path):
    import argparse
    cfg, _ = C.parse(["--config", "configs/shapes.yaml", "--batch_size", "10", "--learning_rate", "5e-4",
                      "--max_epochs", "25", "--checkpoint_path", "log_st", "--id", "st", "--finetune_layers", "layer3,layer4"],
                     argparse.ArgumentParser(), ("data", "model", "train"))
    assert cfg.train.batch_size == 10 and cfg.train.learning_rate == 5e-4 and cfg.train.max_epochs == 25
    assert str(C.run_dir(cfg.train)) == "log_st/st"
    assert cfg.train.finetune_layers == ["layer3", "layer4"]
    assert cfg.featurize.backbone == "resnet18"  # from the YAML
    C.save(cfg, tmp_path / "config.yaml")
    assert C.load(tmp_path / "config.yaml") == cfg


def test_shared_names_need_a_section():
    import argparse
    # batch_size exists in featurize and train: featurize's CLI sees only its own sections
    cfg, _ = C.parse(["--config", "configs/shapes.yaml", "--batch_size", "3"], argparse.ArgumentParser(), ("data", "featurize"))
    assert cfg.featurize.batch_size == 3
    cfg, _ = C.parse(["--config", "configs/shapes.yaml", "--train.batch_size", "7", "--featurize.batch_size", "2"],
                     argparse.ArgumentParser(), ("data", "featurize", "train"))
    assert (cfg.train.batch_size, cfg.featurize.batch_size) == (7, 2)


def test_unknown_keys_are_errors(tmp_path):
    import argparse
    (tmp_path / "bad.yaml").write_text("train:\n  batchsize: 3\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml: train: unknown key\(s\) batchsize"):
        C.load(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("trian: {}\n")
    with pytest.raises(C.ConfigError, match=r"unknown section\(s\) trian"):
        C.load(tmp_path / "bad2.yaml")
    with pytest.raises(C.ConfigError, match="unknown option"):
        C.parse(["--config", "configs/shapes.yaml", "--batch_sise", "3"], argparse.ArgumentParser(), ("train",))


def test_typed_overrides():
    import argparse
    with pytest.raises(C.ConfigError, match="--batch_size: expected an integer"):
        C.parse(["--config", "configs/shapes.yaml", "--batch_size", "ten"], argparse.ArgumentParser(), ("train",))
    with pytest.raises(C.ConfigError, match="expected true or false"):
        C.parse(["--config", "configs/shapes.yaml", "--finetune", "maybe"], argparse.ArgumentParser(), ("train",))
    with pytest.raises(C.ConfigError, match="--resume: must be one of false, true, auto"):
        C.parse(["--config", "configs/shapes.yaml", "--resume", "maybe"], argparse.ArgumentParser(), ("train",))
    for flag, want in ((["--resume"], "true"), (["--resume", "auto"], "auto"), (["--resume", "false"], "false")):
        cfg, _ = C.parse(["--config", "configs/shapes.yaml", *flag], argparse.ArgumentParser(), ("train",))
        assert cfg.train.resume == want


def test_every_shipped_config_loads(tmp_path):
    """Every YAML in configs/ loads with each of its values taken as written (none dropped or
    defaulted), and a saved resolved config loads back equal."""
    import glob

    import yaml
    names = sorted(glob.glob("configs/*.yaml"))
    assert {"configs/shapes.yaml", "configs/coco.yaml", "configs/tiny.yaml"} <= set(names)
    for name in names:
        cfg = C.load(name)
        written, loaded = yaml.safe_load(open(name)) or {}, C.to_dict(cfg)
        for section, values in written.items():
            for key, value in (values or {}).items():
                got = loaded[section][key]
                assert got == (float(value) if isinstance(got, float) else value), f"{name}: {section}.{key}"
        C.save(cfg, tmp_path / "config.yaml")
        assert C.load(tmp_path / "config.yaml") == cfg, name


def test_weights_files_follow_the_umask(tmp_path):
    """safetensors creates its files 0600; ours are replaced atomically and get what open() would give."""
    import os
    import stat
    import torch
    from common.files import save_tensors
    old = os.umask(0o022)
    try:
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left
