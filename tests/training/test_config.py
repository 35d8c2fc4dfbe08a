from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from kfac_tn.enums import Inversion
from kfac_tn.optim.hyperparams import RULES, Number
from kfac_tn.training.config import (
    GROUPS,
    KFAC_KEYS,
    KFAC_LAYER_KEYS,
    OPTIMIZER_KEYS,
    ConfigError,
    DataName,
    ModelConfig,
    OptimizerConfig,
    OptimizerName,
    ScheduleConfig,
    ScheduleName,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_reference,
    config_to_dict,
    kfac_arguments,
    load_config,
    parse_override,
    read_yaml,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def data_root_overrides(path: Path, tmp_path: Path) -> list[str]:
    """Point a shipped config's data.root at a directory laid out like the real data set."""
    name = read_yaml(path).get("data", {}).get("name", "digits")
    if name in ("cifar10", "cifar100"):
        sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        (tmp_path / sub).mkdir(exist_ok=True)
    elif name == "imagenet":
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "val").mkdir(exist_ok=True)
    else:
        return []
    return [f"data.root={tmp_path}"]


def test_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    assert {
        "digits_kfac",
        "digits_sgd",
        "cifar10_resnet18_kfac",
        "cifar10_resnet18_sgd",
        "cifar100_allcnnc_kfac",
        "imagenet_resnet50_kfac",
        "digits_autoencoder_kfac",
        "digits_autoencoder_adam",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path, data_root_overrides(path, tmp_path))
    # every key written in the file is reflected in the typed config
    raw = read_yaml(path)
    plain = config_to_dict(cfg)
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if section == "data" and k == "root":
                    continue
                assert plain[section][k] == (list(v) if isinstance(v, tuple) else v), (section, k)
        else:
            assert plain[section] == values, section
    assert config_from_dict(plain) == cfg


def test_default_config_file_equals_builtin_default():
    """`kfac-tn train` without a config = schema defaults; the shipped file spells them out."""
    assert load_config(CONFIG_DIR / "digits_kfac.yaml") == TrainConfig() == load_config(None)
    assert config_to_dict(TrainConfig()) == read_yaml(CONFIG_DIR / "digits_kfac.yaml")


def test_sgd_twin_differs_only_in_optimizer():
    kfac = config_to_dict(load_config(CONFIG_DIR / "digits_kfac.yaml"))
    sgd = config_to_dict(load_config(CONFIG_DIR / "digits_sgd.yaml"))
    assert {k for k in kfac if kfac[k] != sgd[k]} == {"optimizer"}
    assert sgd["optimizer"]["name"] == "sgd"


BAD_CONFIGS = [
    (
        "bad_choice",
        {"optimizer": {"kfac_approx": "expnd"}},
        "optimizer.kfac_approx: 'expnd' is not one of ['expand', 'reduce']",
    ),
    ("unknown_top_key", {"epoch": 3}, "epoch: unknown key; allowed keys: ['model', 'data'"),
    ("unknown_nested_key", {"optimizer": {"dampnig": 1e-3}}, "optimizer.dampnig: unknown key"),
    ("wrong_type_int", {"epochs": "ten"}, "epochs: 'ten' is not an int"),
    ("wrong_type_float", {"optimizer": {"lr": "fast"}}, "optimizer.lr: 'fast' is not a float"),
    ("bool_is_not_int", {"batch_size": True}, "batch_size: True is not an int"),
    (
        "wrong_type_bool",
        {"data": {"augment": "yes please"}},
        "data.augment: 'yes please' is not a bool",
    ),
    ("section_not_mapping", {"model": "resnet18"}, "model: 'resnet18' is not a mapping"),
    (
        "bad_precision",
        {"precision": "fp8"},
        "precision: 'fp8' is not one of ['fp32', 'bf16', 'fp16']",
    ),
    (
        "bad_distributed",
        {"distributed": "horovod"},
        "distributed: 'horovod' is not one of ['off', 'ddp']",
    ),
    ("bad_schedule", {"schedule": {"name": "linear"}}, "schedule.name: 'linear' is not one of"),
    (
        "bad_model",
        {"model": {"name": "resnet9000"}},
        "model.name: 'resnet9000' is not a built-in model",
    ),
    ("bad_data_name", {"data": {"name": "mnist"}}, "data.name: 'mnist' is not one of ['digits'"),
    (
        "negative_lr",
        {"optimizer": {"lr": -0.1}},
        "optimizer.lr: -0.1 is out of range; allowed: >= 0",
    ),
    ("momentum_one", {"optimizer": {"momentum": 1.0}}, "optimizer.momentum: 1.0 is out of range"),
    ("zero_epochs", {"epochs": 0}, "epochs: 0 is out of range; allowed: >= 1"),
    (
        "keep_prob_zero",
        {"sampled_backprop": {"keep_prob": 0}},
        "sampled_backprop.keep_prob: 0.0 is out",
    ),
    ("bad_device", {"device": "gpu"}, "device: 'gpu' is not one of ['auto', 'cpu', 'cuda'"),
    (
        "sgd_with_kfac_key",
        {"optimizer": {"name": "sgd", "damping": 1e-3}},
        "optimizer.damping: does not apply to optimizer.name 'sgd'",
    ),
    (
        "adam_with_momentum",
        {"optimizer": {"name": "adam", "momentum": 0.9}},
        "optimizer.momentum: does not apply to optimizer.name 'adam'",
    ),
    (
        "layer_setting_unknown_key",
        {"optimizer": {"layer_settings": {"features.*": {"lr": 0.1}}}},
        "optimizer.layer_settings['features.*'].lr: unknown key; allowed keys: ['damping'",
    ),
    (
        "layer_setting_bad_choice",
        {"optimizer": {"layer_settings": {"features.*": {"kfac_approx": "full"}}}},
        "optimizer.layer_settings['features.*'].kfac_approx: 'full' is not one of",
    ),
    (
        "layer_setting_bad_value",
        {"optimizer": {"layer_settings": {"fc": "ignore"}}},
        "optimizer.layer_settings['fc']: 'ignore' is neither 'skip' nor a mapping",
    ),
    (
        "betas_length",
        {"optimizer": {"name": "adam", "betas": [0.9]}},
        "optimizer.betas: [0.9] is not a list of 2",
    ),
    (
        "width_non_resnet",
        {"model": {"name": "vgg11", "width": 0.5}},
        "model.width: 0.5 is only supported",
    ),
    (
        "cifar_stem_builtin",
        {"model": {"cifar_stem": True}},
        "model.cifar_stem: True is only supported",
    ),
    (
        "cifar_needs_root",
        {"data": {"name": "cifar10"}},
        "data.root: None is required for data.name 'cifar10'",
    ),
    (
        "missing_cifar_root",
        {"data": {"name": "cifar100", "root": "/nonexistent/cifar"}},
        "data.root: '/nonexistent/cifar' does not contain cifar-100-python/",
    ),
    (
        "missing_imagenet_root",
        {"data": {"name": "imagenet", "root": "/nonexistent/imagenet"}},
        "data.root: '/nonexistent/imagenet' has no train/ and val/ directory",
    ),
]


@pytest.mark.parametrize(
    ("raw", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_rejected_with_message(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"epochs": "x", "optimizer": {"lr": "y", "bogus": 1}})
    text = str(info.value)
    assert "epochs: 'x'" in text and "optimizer.lr: 'y'" in text and "optimizer.bogus" in text


def test_cifar_download_flag_skips_path_check(tmp_path):
    cfg = config_from_dict(
        {"data": {"name": "cifar10", "root": str(tmp_path / "new"), "download": True}}
    )
    assert cfg.data.name == DataName.CIFAR10 and cfg.data.download


OVERRIDES = [
    ("float_sci", "optimizer.lr=1e-3", ("optimizer", "lr"), 0.001),
    ("int", "epochs=3", ("epochs",), 3),
    ("bool", "data.augment=false", ("data", "augment"), False),
    ("null", "optimizer.kl_clip=null", ("optimizer", "kl_clip"), None),
    ("list", "schedule.milestones=[3, 5]", ("schedule", "milestones"), [3, 5]),
    ("enum", "optimizer.kfac_approx=reduce", ("optimizer", "kfac_approx"), "reduce"),
    ("string_path", "data.root=/tmp/x y", ("data", "root"), "/tmp/x y"),
    ("yaml_off_is_not_false", "distributed=off", ("distributed",), "off"),
    ("numeric_name_is_text", "run_name=2024", ("run_name",), "2024"),
    (
        "bracketed_layer_pattern",
        "optimizer.layer_settings[features.0]=skip",
        ("optimizer", "layer_settings"),
        {"features.0": "skip"},
    ),
    (
        "flow_mapping",
        "optimizer.layer_settings={'fc*': {damping: 0.01}}",
        ("optimizer", "layer_settings"),
        {"fc*": {"damping": 0.01}},
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "expected"), [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES]
)
def test_override_typing(text, path, expected):
    raw = apply_overrides({"optimizer": {"momentum": 0.5}}, [text])
    cfg = config_from_dict(raw)
    node = cfg
    for p in path:
        node = getattr(node, p)
    assert (node.value if hasattr(node, "value") else node) == expected
    assert type(node) is type(expected) or hasattr(node, "value")
    assert cfg.optimizer.momentum == 0.5  # untouched keys survive


def test_overrides_validate_into_config():
    cfg = load_config(
        None, ["optimizer.lr=1e-3", "schedule.milestones=[3,5]", "optimizer.kl_clip=null"]
    )
    assert (
        cfg.optimizer.lr == 0.001
        and cfg.schedule.milestones == [3, 5]
        and cfg.optimizer.kl_clip is None
    )
    with pytest.raises(ConfigError, match="optimizer.lr: 'abc' is not a float"):
        load_config(None, ["optimizer.lr=abc"])


@pytest.mark.parametrize(
    "text", ["epochs", "=3", "a..b=1", ""], ids=["no_equals", "no_key", "empty_part", "empty"]
)
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="is not of the form dotted.key=value"):
        parse_override(text)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [("- a\n- b\n", "holds list, not a mapping"), ("epochs: [\n", "is not valid YAML")],
    ids=["list", "syntax"],
)
def test_bad_yaml_file(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match="is not an existing file"):
        load_config(tmp_path / "missing.yaml")


# --- the optimizer section maps one to one onto the constructors ------------------------------


def test_kfac_keys_match_kfac_signature():
    from kfac_tn.optimizer import KFAC

    params = set(inspect.signature(KFAC).parameters) - {"model", "params"}
    # loss/loss_reduction follow from the task, grad_scaler from the precision
    assert set(KFAC_KEYS) == params - {"loss", "loss_reduction", "grad_scaler"}
    sig = inspect.signature(KFAC).parameters
    defaults = TrainConfig().optimizer
    for key in (
        "nesterov",
        "factor_update_period",
        "inverse_update_period",
        "mc_samples",
        "bucket_cap_mb",
    ):
        assert type(getattr(defaults, key)) is type(sig[key].default), key


def test_layer_keys_match_kfac():
    from kfac_tn.optim import hyperparams

    assert tuple(KFAC_LAYER_KEYS) == tuple(hyperparams.LAYER_KEYS)


def test_lr_zero_is_allowed_as_by_the_optimizer():
    assert config_from_dict({"optimizer": {"lr": 0}}).optimizer.lr == 0.0


_NUMBER_RULES = [k for k, r in RULES.items() if isinstance(r, Number) and k in KFAC_KEYS]


@pytest.mark.parametrize("key", _NUMBER_RULES)
def test_config_ranges_are_the_optimizers_rules(key):
    """A value the optimizer's rule rejects is rejected by the config with the rule's text."""
    from kfac_tn.optimizer import KFAC

    rule = RULES[key]
    bad = rule.low if rule.low_open else rule.low - 1
    shown = float(bad) if isinstance(rule.low, float) else bad
    message = f"optimizer.{key}: {shown!r} is out of range; allowed: {rule.allowed}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"optimizer": {key: bad}})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        KFAC(model, **{key: bad})


def test_layer_setting_values_follow_the_rules():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"optimizer": {"layer_settings": {"fc": {"damping": 0, "inversion": 1}}}})
    text = str(info.value)
    assert "optimizer.layer_settings['fc'].damping: 0.0 is out of range; allowed: > 0" in text
    assert "optimizer.layer_settings['fc'].inversion: 1 is not one of" in text
    assert "inversion: 1 is out of range" not in text  # a type error is reported once


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match="optimizer.nesterov: True needs momentum > 0"):
        config_from_dict({"optimizer": {"name": "sgd", "nesterov": True, "momentum": 0.0}})


def test_kfac_arguments_are_library_values():
    cfg = load_config(
        None,
        [
            "optimizer.factor_dtype=float64",
            "optimizer.kfac_approx=reduce",
            "optimizer.layer_settings={'fc*': {inverse_dtype: float32, inversion: cholesky}}",
        ],
    )
    kwargs = kfac_arguments(cfg.optimizer)
    assert set(kwargs) == set(KFAC_KEYS)
    assert kwargs["factor_dtype"] is torch.float64 and kwargs["inverse_dtype"] is None
    assert kwargs["kfac_approx"] == "reduce" and type(kwargs["kfac_approx"]) is str
    fc = {"inverse_dtype": torch.float32, "inversion": "cholesky"}
    assert kwargs["layer_settings"] == {"fc*": fc}
    assert kfac_arguments(TrainConfig().optimizer)["layer_settings"] is None


def test_torch_optimizer_keys_match_signatures():
    for name, cls in (
        (OptimizerName.SGD, torch.optim.SGD),
        (OptimizerName.ADAM, torch.optim.Adam),
        (OptimizerName.ADAMW, torch.optim.AdamW),
    ):
        assert set(OPTIMIZER_KEYS[name]) <= set(inspect.signature(cls).parameters), name


ENUM_FIELDS = ["kfac_approx", "fisher_type", "inversion", "distributed_strategy"]


@pytest.mark.parametrize("field", ENUM_FIELDS)
def test_enum_choices_accepted_by_kfac(field):
    """Every choice the schema allows is accepted by KFAC; KFAC rejects others too."""
    from kfac_tn.optimizer import KFAC

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    tp = {f.name: f.type for f in dataclasses.fields(TrainConfig().optimizer)}
    enum_cls = {"inversion": Inversion}.get(field) or type(getattr(TrainConfig().optimizer, field))
    assert enum_cls.__name__ in str(tp[field])
    for choice in enum_cls:
        opt = KFAC(model, **{field: choice.value})
        opt.remove_hooks()
    with pytest.raises(ValueError, match=field):
        KFAC(model, **{field: "bogus"})


def test_config_reference_lists_every_key():
    text = config_reference()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), prefix + f.name + ".")
            else:
                yield prefix + f.name

    all_keys = list(keys(TrainConfig))
    assert len(all_keys) > 60
    for key in all_keys:
        assert f"| `{key}` |" in text, key
    assert "one of ['expand', 'reduce']" in text


def test_saved_yaml_reloads(tmp_path):
    from kfac_tn.training.config import save_config

    cfg = load_config(
        None, ["optimizer.name=adamw", "optimizer.betas=[0.8, 0.9]", "model.name=3c3d"]
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert "damping" not in yaml.safe_load((tmp_path / "c.yaml").read_text())["optimizer"]


# config.py declares no choice enum of its own for the optimizer: its fields are typed with the
# library's enums (kfac_tn.enums), the very classes the optimizer parses.
_ENUM_FIELDS = [
    ("kfac_approx", "KFACApprox"),
    ("fisher_type", "FisherType"),
    ("inversion", "Inversion"),
    ("distributed_strategy", "DistributedStrategy"),
    ("factor_dtype", "DtypeName"),
    ("inverse_dtype", "DtypeName"),
]


@pytest.mark.parametrize("pair", _ENUM_FIELDS, ids=[p[0] for p in _ENUM_FIELDS])
def test_config_uses_library_enums(pair):
    import typing

    from kfac_tn import enums
    from kfac_tn.training.config import OptimizerConfig

    field, library_name = pair
    tp = typing.get_type_hints(OptimizerConfig)[field]
    config_enum = next(a for a in (tp, *typing.get_args(tp)) if isinstance(a, type))
    assert config_enum is getattr(enums, library_name)


# --- config groups: SECTION=NAME replaces the section by NAME's defaults ----------------------


def test_optimizer_group_replaces_the_section():
    sgd = CONFIG_DIR / "digits_sgd.yaml"
    with pytest.raises(ConfigError, match="optimizer.momentum: does not apply"):
        load_config(sgd, ["optimizer.name=adam"])  # renaming keeps SGD's keys
    cfg = load_config(sgd, ["optimizer=adam"])
    assert cfg.optimizer == OptimizerConfig(name=OptimizerName.ADAM, lr=1e-3)  # group's own lr
    refined = load_config(sgd, ["optimizer=adam", "optimizer.lr=1e-3", "optimizer.eps=1e-6"])
    assert refined.optimizer == OptimizerConfig(name=OptimizerName.ADAM, lr=1e-3, eps=1e-6)
    assert load_config(None, ["optimizer=adamw", "optimizer.lr=3e-4"]).optimizer.lr == 3e-4
    assert config_to_dict(refined)["optimizer"] == {
        "name": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-6,
        "weight_decay": 0.0005,
        "amsgrad": False,
    }
    # left to right: a group after a key resets it
    assert load_config(None, ["optimizer.lr=0.3", "optimizer=sgd"]).optimizer.lr == 0.05
    assert refined.model == cfg.model == load_config(sgd).model  # other sections untouched


def test_other_groups_and_bad_group_names():
    assert set(GROUPS) == {"model", "data", "optimizer", "schedule"}
    cfg = load_config(None, ["schedule=step", "schedule.gamma=0.5", "model=3c3d"])
    assert cfg.schedule == ScheduleConfig(name=ScheduleName.STEP, gamma=0.5)
    assert cfg.model == ModelConfig(name="3c3d")
    with pytest.raises(ConfigError, match=r"optimizer.name: 'lbfgs' is not one of \['kfac'"):
        load_config(None, ["optimizer=lbfgs"])
    with pytest.raises(ConfigError, match="sampled_backprop: 'spatial' is not a mapping"):
        load_config(None, ["sampled_backprop=spatial"])  # no name: not a group


# --- hardening (#10 §2): run names, non-finite values, overrides, YAML files -------------------

BAD_RUN_NAMES = [
    ("parent", "../victim"),
    ("absolute", "/abs/path"),
    ("nested", "a/b"),
    ("dot", "."),
    ("dotdot", ".."),
    ("empty", ""),
    ("backslash", "a\\b"),
]


@pytest.mark.parametrize("name", [c[1] for c in BAD_RUN_NAMES], ids=[c[0] for c in BAD_RUN_NAMES])
def test_run_name_is_one_path_component(name):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"run_name": name})
    text = str(info.value)
    assert f"run_name: {name!r} is not a single directory name; allowed: null or a name" in text


def _numeric_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, object]]:
    """Every dotted key of the schema whose type involves float or int (found, not listed)."""
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{prefix}{f.name}.")
        elif re.search(r"\b(float|int)\b", str(tp)):
            out.append((f"{prefix}{f.name}", tp))
    return out


NUMERIC_KEYS = [k for k, _ in _numeric_keys()]
NON_FINITE = [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")]


def _override(key: str, text: str) -> list[str]:
    """``key=text``, behind an optimizer.name that takes ``key``; containers get one element."""
    tp = dict(_numeric_keys())[key]
    value = f"[{text}, 0.5]" if "tuple" in str(tp) else f"[{text}]" if "list" in str(tp) else text
    pre = []
    if key.startswith("optimizer."):
        name = next(n for n, keys in OPTIMIZER_KEYS.items() if key.split(".")[1] in keys)
        pre = [f"optimizer.name={name.value}"]
    return [*pre, f"{key}={value}"]


def test_numeric_keys_are_found():
    assert {"optimizer.lr", "model.width", "dist_timeout_s", "optimizer.betas"} <= set(NUMERIC_KEYS)
    assert {"optimizer.bucket_cap_mb", "schedule.milestones", "epochs"} <= set(NUMERIC_KEYS)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_non_finite_values_are_rejected_for_every_numeric_key(key):
    """`.inf`/`-.inf`/`.nan` never pass: float keys say 'not finite', int keys 'not an int'."""
    tp = str(dict(_numeric_keys())[key])
    reason = "is not finite; allowed: " if "float" in tp else "is not an int"
    for text, shown in NON_FINITE:
        with pytest.raises(ConfigError) as info:
            load_config(None, _override(key, text))
        lines = str(info.value).splitlines()[1:]
        assert len(lines) == 1, lines  # reported once, by the type check
        assert lines[0].strip().startswith(key) and f": {shown} {reason}" in lines[0], lines


TYPE_AND_RANGE = [
    (
        "int_and_int",
        ["epochs=abc", "batch_size=0"],
        ["epochs: 'abc' is not an int", "batch_size: 0"],
    ),
    (
        "float_and_float",
        ["optimizer.lr=abc", "optimizer.damping=0"],
        ["optimizer.lr: 'abc' is not a float", "optimizer.damping: 0.0 is out of range"],
    ),
    (
        "list_and_section",
        ["schedule.milestones=[1, x]", "schedule.gamma=2"],
        ["schedule.milestones[1]: 'x' is not an int", "schedule.gamma: 2.0 is out of range"],
    ),
    (
        "choice_and_range",
        ["optimizer.name=bogus", "epochs=0"],
        ["optimizer.name: 'bogus' is not one of", "epochs: 0 is out of range"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [c[1:] for c in TYPE_AND_RANGE], ids=[c[0] for c in TYPE_AND_RANGE]
)
def test_type_errors_do_not_hide_range_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == len(expected), lines  # each problem once, nothing invented
    for line, text in zip(lines, expected):
        assert text in line


BAD_YAML_FILES = [
    (
        "duplicate_top_level",
        b"epochs: 2\nseed: 1\nepochs: 3\n",
        "line 3: duplicate key 'epochs' (first on line 1)",
    ),
    (
        "duplicate_in_section",
        b"optimizer:\n  lr: 0.1\n  damping: 0.01\n  lr: 0.2\n",
        "line 4: duplicate key 'lr' (first on line 2)",
    ),
    (
        "duplicate_in_flow_mapping",
        b"optimizer: {layer_settings: {fc: skip, fc: {damping: 0.1}}}\n",
        "line 1: duplicate key 'fc' (first on line 1)",
    ),
    ("latin1", b"epochs: 2\nrun_name: caf\xe9\n", "line 2: byte 0xe9 is not UTF-8"),
    ("binary", b"\xff\xfe\x00\x01", "line 1: byte 0xff is not UTF-8"),
]


@pytest.mark.parametrize(
    ("content", "message"), [c[1:] for c in BAD_YAML_FILES], ids=[c[0] for c in BAD_YAML_FILES]
)
def test_yaml_file_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config: {str(path)!r} {message}")


def test_yaml_merge_key_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, momentum: 0.5}\noptimizer:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml(path)["optimizer"] == {"lr": 0.2, "momentum": 0.5}


def test_duplicate_key_in_an_override_value():
    with pytest.raises(ConfigError, match="duplicate key 'fc'"):
        parse_override("optimizer.layer_settings={fc: skip, fc: skip}")


LAYER_OVERRIDES = [
    ("pattern_key", ["optimizer.layer_settings.conv1.damping=0.01"], {"conv1": {"damping": 0.01}}),
    ("pattern_skip", ["optimizer.layer_settings.fc=skip"], {"fc": "skip"}),
    (
        "keys_accumulate",
        [
            "optimizer.layer_settings.conv1.damping=0.01",
            "optimizer.layer_settings.conv1.inversion=cholesky",
        ],
        {"conv1": {"damping": 0.01, "inversion": "cholesky"}},
    ),
    (
        "bracketed_dotted_pattern",
        ["optimizer.layer_settings[layer1.0.conv1].damping=0.01"],
        {"layer1.0.conv1": {"damping": 0.01}},
    ),
    (
        "quoted_as_in_messages",
        ["optimizer.layer_settings['layer1.0.conv1'].damping=0.01"],
        {"layer1.0.conv1": {"damping": 0.01}},
    ),
    (
        "bracketed_char_class",
        ["optimizer.layer_settings[layer[12].*]=skip"],
        {"layer[12].*": "skip"},
    ),
    (
        "json_mapping",
        ['optimizer.layer_settings={"layer1.0.conv1": {"damping": 0.01}}'],
        {"layer1.0.conv1": {"damping": 0.01}},
    ),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [c[1:] for c in LAYER_OVERRIDES],
    ids=[c[0] for c in LAYER_OVERRIDES],
)
def test_layer_settings_override_forms(overrides, expected):
    assert load_config(None, overrides).optimizer.layer_settings == expected


BAD_LAYER_OVERRIDES = [
    ("zero_damping", "optimizer.layer_settings.conv1.damping=0", "damping", "0"),
    ("negative_damping", "optimizer.layer_settings[layer1.0.conv1].damping=-1", "damping", "-1"),
    ("inf_damping", "optimizer.layer_settings.conv1.damping=.inf", "damping", ".inf"),
    ("decay_one", "optimizer.layer_settings.conv1.factor_decay=1", "factor_decay", "1"),
    (
        "period_zero",
        "optimizer.layer_settings.fc.inverse_update_period=0",
        "inverse_update_period",
        "0",
    ),
    ("bad_choice", "optimizer.layer_settings.fc.inversion=svd", "inversion", "svd"),
]


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [c[1:] for c in BAD_LAYER_OVERRIDES],
    ids=[c[0] for c in BAD_LAYER_OVERRIDES],
)
def test_layer_settings_values_get_the_top_level_message(override, key, value):
    """A layer override is checked by the optimizer's rule, with the top-level key's message."""
    pattern = parse_override(override)[0][2]
    with pytest.raises(ConfigError) as layer:
        load_config(None, [override])
    with pytest.raises(ConfigError) as top:
        load_config(None, [f"optimizer.{key}={value}"])
    top_line = str(top.value).splitlines()[1].strip()
    assert top_line.startswith(f"optimizer.{key}: ")
    expected = f"optimizer.layer_settings[{pattern!r}].{key}: " + top_line.split(": ", 1)[1]
    assert str(layer.value).splitlines()[1:] == ["  " + expected]


AMBIGUOUS_LAYER_OVERRIDES = [
    ("dotted_pattern", "optimizer.layer_settings.features.0=skip", "[features.0]="),
    (
        "dotted_pattern_key",
        "optimizer.layer_settings.layer1.0.conv1.damping=0.1",
        "[layer1.0.conv1].damping=",
    ),
    ("unbalanced", "optimizer.layer_settings[layer1.0.conv1.damping=0.1", "dotted.key=value"),
]


@pytest.mark.parametrize(
    ("override", "hint"),
    [c[1:] for c in AMBIGUOUS_LAYER_OVERRIDES],
    ids=[c[0] for c in AMBIGUOUS_LAYER_OVERRIDES],
)
def test_dotted_layer_patterns_need_brackets(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert hint in str(info.value) and repr(override) in str(info.value)
