"""Every training / model setting reaches the same config from a flag, a config file
(YAML and JSON) and ``run()``'s dict; ranges and choices refused alike on every path; YAML number
forms read as the command line reads them; README's variant table; config.json round trip."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from wtmodels import train as train_mod
from wtmodels.cli import build_parser, parse_settings
from wtmodels.models import ModelConfig, get_config, list_models
from wtmodels.train_config import TrainConfig, load_config_file, resolve_config, train_field_names

ROOT = Path(__file__).resolve().parents[2]
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]

# a valid value, away from the default, for every setting (the test fails on a new field)
GOOD = dict(
    model="deq_s", dataset="synthetic", epochs=3, out="runs/x", resume=True, seed=7,
    data_dir="data/d", download=True, train_size=100, test_size=50, data_seed=3, augment=False,
    image_size=16, synthetic_channels=2, synthetic_classes=4, batch_size=8, test_batch_size=9,
    num_workers=2, optimizer="sgd", lr=0.25, momentum=0.5, nesterov=True, weight_decay=0.125,
    schedule="constant", warmup_epochs=1.5, min_lr=0.005, label_smoothing=0.25, grad_clip=2.5,
    max_bad_steps=4, amp=True, amp_dtype="float16", channels_last=True, compile=True,
    device="cpu", tf32=True, threads=3, pretrain_steps=10, jac_reg_weight=0.5, jac_reg_freq=0.25,
    progress="lines",
    num_classes=4, in_chans=2, core="ode", depth=4, width=16, stages=2, norm="layer",
    norm_groups=2, dropout=0.25, weight_norm=True, spectral_norm=True, mask_k=3,
    mask_density=0.25, mask_kind="bernoulli", mask_seed=5, mask_schedule="block",
    f_solver="broyden", f_max_iter=11, f_tol=0.001, b_solver="fixed_point", b_max_iter=12,
    b_tol=0.0001, grad="phantom", phantom_steps=2, stop_mode="abs", eval_f_max_iter=13,
    ode_method="rk4", ode_rtol=0.01, ode_atol=0.02, ode_adjoint=True, ode_T=2.5,
)


def _argv(key, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + key.replace("_", "-")]
    return [flag, "none" if value is None else str(value)]


def _flat(cfg: TrainConfig) -> dict:
    return {**{k: v for k, v in cfg.to_dict().items() if k != "model_overrides"},
            **cfg.model_overrides}


def _from_file(tmp_path: Path, data: dict, suffix: str) -> TrainConfig:
    path = tmp_path / f"c{suffix}"
    path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
    return resolve_config(parse_settings(["--config", str(path)]))


def test_every_field_has_a_test_value():
    assert set(GOOD) == set(train_field_names()) | set(MODEL_FIELDS)


@pytest.mark.parametrize("key", sorted(GOOD))
def test_field_same_from_flag_file_and_run(tmp_path, key):
    value = GOOD[key]
    want = value
    paths = {
        "flag": resolve_config(parse_settings(_argv(key, value))),
        "yaml": _from_file(tmp_path, {key: value}, ".yaml"),
        "json": _from_file(tmp_path, {key: value}, ".json"),
        "dashed json": _from_file(tmp_path, {key.replace("_", "-"): value}, ".json"),
        "run dict": resolve_config({key: value}),
    }
    if key in MODEL_FIELDS:
        paths["nested"] = _from_file(tmp_path, {"model_overrides": {key: value}}, ".yaml")
    for where, cfg in paths.items():
        assert _flat(cfg)[key] == want and type(_flat(cfg)[key]) is type(want), (where, cfg)
        if key in MODEL_FIELDS:
            assert cfg.model_overrides == {key: want}, where


def test_flags_override_every_setting_of_a_file(tmp_path):
    # the file sets every setting; each flag puts back the default: the flags win everywhere
    defaults = {**TrainConfig().to_dict(), **dataclasses.asdict(ModelConfig())}
    defaults.pop("model_overrides")
    argv = [a for key in GOOD for a in _argv(key, defaults[key])]
    for suffix, data in ((".yaml", GOOD), (".json", {  # config.json's nested form too
            **{k: v for k, v in GOOD.items() if k not in MODEL_FIELDS},
            "model_overrides": {k: v for k, v in GOOD.items() if k in MODEL_FIELDS}})):
        path = tmp_path / f"all{suffix}"
        path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
        flat = _flat(resolve_config(parse_settings(["--config", str(path), *argv])))
        assert flat == defaults, suffix
        # and without flags the file's values
        assert _flat(resolve_config(parse_settings(["--config", str(path)]))) == GOOD, suffix


# refused values: TrainConfig bounds come from its field metadata; ModelConfig's are listed
MODEL_BAD = dict(
    num_classes=[0], in_chans=[0], core=["deeq"], depth=[0], width=[0], stages=[0],
    norm=["batch"], norm_groups=[0], dropout=[1.0, -0.25], mask_k=[-1], mask_density=[0.0, 1.5],
    mask_kind=["block"], mask_seed=[-1], mask_schedule=["random"], f_solver=["newton"],
    f_max_iter=[0], f_tol=[0.0], b_solver=["newton"], b_max_iter=[0], b_tol=[-1.0],
    grad=["backprop"], phantom_steps=[0], stop_mode=["max"], eval_f_max_iter=[0],
    ode_method=["rk5"], ode_rtol=[0.0], ode_atol=[-1.0], ode_T=[0.0],
)
CHOICES = {"core": "unrolled", "norm": "group", "mask_kind": "random", "grad": "ift",
           "mask_schedule": "cyclic", "stop_mode": "rel", "f_solver": "anderson",
           "b_solver": "anderson", "ode_method": "dopri5"}


def _bad_values() -> list[tuple[str, object]]:
    cases = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("flag", True):
            continue
        if "choices" in meta:
            cases.append((f.name, "nonsense"))
        for key, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            if key in meta:
                bound = meta[key]
                cases.append((f.name, bound + delta if isinstance(GOOD[f.name], int)
                              and not isinstance(GOOD[f.name], bool) else bound + delta / 2))
    cases += [(k, v) for k, vs in MODEL_BAD.items() for v in vs]
    return cases


def _refused(settings_or_argv, *, argv=False) -> str:
    with pytest.raises(ValueError) as info:
        settings = parse_settings(settings_or_argv) if argv else settings_or_argv
        cfg = resolve_config(settings)
        get_config(cfg.model, **cfg.model_overrides)
    return str(info.value)


def test_every_ranged_field_has_a_refused_value():
    ranged = {f.name for f in dataclasses.fields(TrainConfig)
              if {"choices", "ge", "gt", "le", "lt"} & set(f.metadata)}
    assert ranged | set(MODEL_BAD) <= {k for k, _ in _bad_values()}
    assert set(MODEL_BAD) == set(MODEL_FIELDS) - {"weight_norm", "spectral_norm", "ode_adjoint"}


@pytest.mark.parametrize("key,value", _bad_values())
def test_bad_value_refused_on_every_path(tmp_path, key, value):
    messages = {"flag": _refused(_argv(key, value), argv=True), "run dict": _refused({key: value})}
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"c{suffix}"
        path.write_text(yaml.safe_dump({key: value}) if suffix == ".yaml"
                        else json.dumps({key: value}))
        messages[suffix] = _refused(["--config", str(path)], argv=True)
    choices = dict(TrainConfig.__dataclass_fields__[key].metadata) if key in GOOD and \
        key not in MODEL_FIELDS else {}
    for where, msg in messages.items():
        assert key.replace("_", "-") in msg or key in msg, (where, msg)
        for choice in choices.get("choices", ()):
            assert choice in msg, (where, msg)
        if key in CHOICES:
            assert CHOICES[key] in msg, (where, msg)


def test_bad_value_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    for argv in (["--optimizer", "rmsprop"], ["--mask-density", "1.5"], ["--threads", "100000"],
                 ["--lr", "nan"], ["--depth", "1e3"]):
        assert train_mod.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("text,key,want", [
    ("seed: 010", "seed", 10),          # YAML 1.1 read octal 8; --seed 010 is 10
    ("mask_seed: 0010", "mask_seed", 10),
    ("train_size: 1_000", "train_size", 1000),   # as int('1_000') on the command line
    ("lr: 1e-3", "lr", 1e-3),
    ("ode_T: 1.0e1", "ode_T", 10.0),
    ("lr: 5", "lr", 5.0),                # an int where a float is due: 5.0
    ("eval_f_max_iter: null", "eval_f_max_iter", None),
    ("out: ~", "out", None),
    ("data_dir: ~/d", "data_dir", "~/d"),
])
def test_yaml_numbers_read_as_the_command_line_reads_them(tmp_path, text, key, want):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    got = _flat(resolve_config(load_config_file(path)))[key]
    assert got == want and type(got) is type(want), got
    if want is not None and not isinstance(want, str):
        flag = _flat(resolve_config(parse_settings(_argv(key, text.split(": ")[1]))))[key]
        assert flag == want


@pytest.mark.parametrize("text", [
    "epochs: 1:30",      # YAML 1.1 base 60: 90
    "seed: 0x10",        # YAML 1.1: 16; --seed 0x10 is refused
    "mask_seed: 0o7",
    "epochs: 1e3", "epochs: 1.0", "epochs: '1'", "epochs: true", "depth: 2.0", "depth: [2]",
    "lr: .inf", "lr: .nan", "f_tol: .nan", "mask_density: .nan", "ode_T: .inf",
    "epochs: null", "depth: null", "amp: 1", "amp: 'true'", "weight_norm: 1",
    "out: none", "data_dir: None", "out: ' null '",  # the CLI's 'none' is no path
    "eval_f_max_iter: none",
])
def test_yaml_corner_refused_naming_the_setting(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    key = text.split(":")[0]
    msg = _refused(["--config", str(path)], argv=True)
    assert key in msg, msg


def test_threads_bounded_as_in_the_benchmarks(tmp_path):
    # 10**6 threads was a segmentation fault (benchmarks.provenance.MAX_THREADS = 1024)
    assert resolve_config({"threads": 1024}).threads == 1024
    path = tmp_path / "c.yaml"
    path.write_text("threads: 1025\n")
    for msg in (_refused({"threads": 1025}), _refused(["--threads", "1025"], argv=True),
                _refused(["--config", str(path)], argv=True)):
        assert "threads must be <= 1024" in msg, msg


def test_unknown_and_repeated_keys_refused(tmp_path):
    valid = set(train_field_names()) | set(MODEL_FIELDS)
    msg = _refused({"lr": 0.1, "learning_rate": 0.1})
    assert "learning_rate" in msg and all(n in msg for n in valid)
    msg = _refused({"model_overrides": {"detph": 3}})
    assert "detph" in msg and all(n in msg for n in MODEL_FIELDS)
    for text, suffix in (("lr: 0.1\nlr: 0.2\n", ".yaml"), ('{"lr": 0.1, "lr": 0.2}', ".json"),
                         ("train-size: 5\ntrain_size: 5\n", ".yaml"),
                         ("depth: 3\nmodel_overrides: {depth: 4}\n", ".yaml"),
                         ("model_overrides: {depth: 3}\nmodel-overrides: {width: 4}\n", ".yaml")):
        path = tmp_path / f"c{suffix}"
        path.write_text(text)
        assert "twice" in _refused(["--config", str(path)], argv=True), text
    # run()'s dict: both spellings of model_overrides (the dashed one was dropped silently)
    assert "twice" in _refused({"model_overrides": {"depth": 3}, "model-overrides": {"width": 4}})
    # a repeated flag: the last one wins (argparse's convention)
    assert parse_settings(["--lr", "0.1", "--lr", "0.2"]) == {"lr": 0.2}


def test_string_none_for_a_path_is_refused_everywhere_but_the_flag():
    assert parse_settings(["--out", "none", "--data-dir", "NULL"]) == {"out": None,
                                                                       "data_dir": None}
    for key in ("out", "data_dir"):
        for text in ("none", "None", "null"):
            assert "null" in _refused({key: text})
        assert resolve_config({key: "./none"}).to_dict()[key] == "./none"


def test_numpy_scalars_from_a_sweep_are_python_values():
    cfg = resolve_config({"epochs": np.int64(2), "lr": np.float32(0.5), "amp": np.bool_(True),
                          "depth": np.int64(3), "mask_density": np.float64(0.25)})
    flat = _flat(cfg)
    assert (flat["epochs"], flat["lr"], flat["amp"], flat["depth"], flat["mask_density"]) == \
        (2, 0.5, True, 3, 0.25)
    assert [type(flat[k]) for k in ("epochs", "lr", "amp", "depth")] == [int, float, bool, int]
    json.dumps(cfg.to_dict())  # config.json takes it


# README "Models": variant table
SMALL, MEDIUM, TINY = (6, 32, 2), (8, 64, 3), (2, 8, 1)


def test_variants_match_the_readme_table():
    want = {}
    for size, shape in (("s", SMALL), ("m", MEDIUM)):
        for fam, core in (("wt", "unrolled"), ("deq", "deq"), ("ode", "ode"),
                          ("untied", "untied")):
            want[f"{fam}_{size}"] = (core, *shape)
    for fam, core in (("wt", "unrolled"), ("deq", "deq"), ("ode", "ode"), ("untied", "untied")):
        want[f"test_{fam}"] = (core, *TINY)
    assert set(list_models()) == set(want)
    for name, (core, depth, width, stages) in want.items():
        cfg = get_config(name)
        assert (cfg.core, cfg.depth, cfg.width, cfg.stages) == (core, depth, width, stages), name
        assert (cfg.mask_k, cfg.weight_norm) == (0, False), name  # no masks, no weight norm
    assert get_config("ode_s").ode_method == "rk4" and get_config("ode_m").ode_method == "dopri5"
    # deq_s: 42 cell evaluations per step = 2 stages x (f_max_iter 20 + 1)
    assert 2 * (get_config("deq_s").f_max_iter + 1) == 42


def test_readme_flags_exist_and_overrides_list_is_modelconfig():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training"):readme.index("## Benchmarks: sweeps")]
    flags = {o for a in build_parser()._actions for o in a.option_strings}
    named = {f for f in re.findall(r"--[a-z][a-z0-9-]*", section) if not f.endswith("-")}
    not_ours = {"--nproc", "--repeats"}  # torchrun's, benchmarks.train_speed's
    assert named - flags - not_ours == set()
    listed = re.search(r"\*\*Overrides\*\* are the `wtmodels.models.ModelConfig` fields: `([^`]*)`",
                       readme).group(1)
    assert [n.split()[0] for n in listed.split(",")] == MODEL_FIELDS
    for prefix in ("--ode-", "--b-"):  # README's --ode-* and --b-* wildcards
        assert any(f.startswith(prefix) for f in flags)


def test_config_json_round_trip_and_resume(tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["--model", "test_wt", "--train-size", "24", "--test-size", "8", "--batch-size", "8",
            "--epochs", "1", "--threads", "1", "--progress", "none", "--device", "cpu",
            "--depth", "3", "--mask-k", "2", "--lr", "0.02", "--out", str(out)]
    assert train_mod.main(argv) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    flat = {**saved["train"], **saved["model_overrides"]}
    assert saved["model_overrides"] == {"depth": 3, "mask_k": 2}
    saved["resumes"] = [{"from_epoch": 0, "env": {}}]  # what a resume adds at top level
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"flat{suffix}"
        path.write_text(json.dumps(flat) if suffix == ".json" else yaml.safe_dump(flat))
        cfg = resolve_config(parse_settings(["--config", str(path), "--out", "b"]))
        assert {**_flat(cfg), "out": str(out)} == flat, suffix
    whole = tmp_path / "config.json"
    whole.write_text(json.dumps(saved))
    assert "flattened" in _refused(["--config", str(whole)], argv=True)
    # a resume given the model overrides in run()'s dashed spelling compares them too (it
    # resumed with depth 3, dropping the depth 4 it was given)
    with pytest.raises(ValueError, match="depth=4"):
        train_mod.run({"out": str(out), "resume": True, "model-overrides": {"depth": 4}})
    with pytest.raises(ValueError, match="depth=4"):
        train_mod.run({"out": str(out), "resume": True, "model_overrides": {"depth": 4}})


def test_a_flag_overrides_a_model_setting_nested_in_the_config_file(tmp_path: Path):
    """``--config FILE`` with flags: "flags override the file", also for a model setting the
    file gives under ``model_overrides`` (config.json's form); it was refused as given twice."""
    from wtmodels.cli import parse_settings
    from wtmodels.train_config import resolve_config

    path = tmp_path / "c.yaml"
    path.write_text("model: test_wt\nlr: 0.1\nmodel_overrides:\n  depth: 2\n  width: 8\n")
    cfg = resolve_config(parse_settings(["--config", str(path), "--depth", "3"]))
    assert cfg.model_overrides == {"depth": 3, "width": 8} and cfg.lr == 0.1
    cfg = resolve_config(parse_settings(["--config", str(path)]))
    assert cfg.model_overrides == {"depth": 2, "width": 8}


def test_a_run_directory_config_json_given_as_config_names_the_way_out():
    """A run's ``config.json`` (train / model_overrides / model_config / data_info / env) is no
    config file; the error says so and what to pass instead of only listing valid keys."""
    from wtmodels.train_config import resolve_config

    run_json = {"train": {"model": "test_wt"}, "model_overrides": {}, "model_config": {},
                "data_info": {}, "env": {}}
    with pytest.raises(ValueError, match="run directory's config.json: pass its 'train' and "
                                         "'model_overrides' entries flattened"):
        resolve_config(run_json)
    with pytest.raises(ValueError, match=r"unknown setting 'lrr'; valid: ") as err:
        resolve_config({"model": "test_wt", "lrr": 0.1})
    assert "config.json" not in str(err.value)
