"""The adapter and layer kinds live in the one registry, and `rankwise list` shows every kind."""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass

import pytest

from rankwise import adapt
from rankwise import registry as registry_module
from rankwise.adapt.method import AdapterMethod, MethodConfig
from rankwise.cli import main
from rankwise.cli.list import collect, format_table
from rankwise.config import Config, document_fields, field_help, option
from rankwise.layers import LAYER_METHODS, get_layer_class
from rankwise.registry import KINDS, Registry, catalogue, registry


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_loader_imports_cleanly(kind: str) -> None:
    importlib.import_module(KINDS[kind])
    assert all(registry_module._NAME.match(n) for n in registry(kind).names())


def test_adapter_views_read_the_registry() -> None:
    names = adapt.list_methods()
    assert names == registry("adapter").names()
    assert {"lora", "rslora", "dora", "pissa"} <= set(names)
    cls, preset = adapt.get_method("rslora")
    entry = registry("adapter").get("rslora")
    assert cls is entry.load() is adapt.get_method("lora")[0]
    assert preset == dict(entry.defaults) == {"use_rslora": True}
    assert adapt.build_config("rslora", rank=4).use_rslora is True
    assert adapt.get_method("lora-xs")[0] is adapt.get_method("lora_xs")[0]  # one naming rule


def test_register_method_adds_to_the_registry_and_unregisters() -> None:
    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(MethodConfig):
        """Toy options.

        Attributes:
            width: how wide the toy is.
        """

        width: int = 3

    class Toy(AdapterMethod):
        """A toy adapter."""

        config_cls = ToyConfig

    adapt.register_method("toy_registry_probe", Toy, summary="a toy", width=5)
    try:
        entry = registry("adapter").get("toy-registry-probe")
        assert entry.load() is Toy and entry.describe() == "a toy"
        assert adapt.build_config("toy_registry_probe") == ToyConfig(width=5)
        with pytest.raises(TypeError, match=r"no option\(s\) \['depth'\]"):
            adapt.register_method("toy_registry_bad", Toy, depth=1)
    finally:
        adapt.unregister_method("toy_registry_probe")
    assert "toy_registry_probe" not in adapt.list_methods()
    with pytest.raises(ValueError, match="unknown adapter method 'toy_registry_probe'"):
        adapt.get_method("toy_registry_probe")


def test_method_configs_are_configs_with_help_for_every_field() -> None:
    for name in adapt.list_methods():
        config = adapt.build_config(name)
        assert type(config).from_dict(config.to_dict()) == config, name
        helps = field_help(type(config))
        missing = [field for field, text in helps.items() if not text]
        assert not missing, f"{name}: fields without help text {missing}"
        assert all(f.metadata["help"] for f in dataclasses.fields(config))  # document_fields
        with pytest.raises(TypeError, match="no option"):
            type(config).from_dict({**config.to_dict(), "no_such_field": 1})


def _configs_of(kind: str) -> dict[str, type[Config]]:
    """The config classes the entries of `kind` build from: a target's ``config_cls``, or the
    target itself where it is a `Config` (class or instance)."""
    found: dict[str, type[Config]] = {}
    for entry in registry(kind).entries():
        target = entry.load()
        for obj in (getattr(target, "config_cls", None), target):
            cls = obj if isinstance(obj, type) else type(obj)
            if obj is not None and issubclass(cls, Config):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def _fields_without_own_help(cls: type[Config]) -> list[str]:
    """Fields of `cls` not declared with ``option(default, "help")`` (docstring help excluded)."""
    return [f.name for f in dataclasses.fields(cls)
            if not str(f.metadata.get("help", "")).strip() or f.metadata.get("help_from_doc")]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_registered_config_field_declares_its_help(kind: str) -> None:
    configs = _configs_of(kind)
    if kind == "adapter":  # every adapter method has a config class, presets share theirs
        classes = {registry(kind).get(n).load().config_cls for n in registry(kind).names()}
        assert set(configs.values()) == classes and len(classes) >= 20
    for name, cls in configs.items():
        assert not _fields_without_own_help(cls), (
            f"{kind} config {name}: fields {_fields_without_own_help(cls)} need "
            "option(default, help)")


def test_fields_without_own_help_finds_plain_and_docstring_fields() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Probe(MethodConfig):
        """Probe.

        Attributes:
            documented: help from the docstring only.
        """

        documented: int = 1
        plain: int = 2
        declared: int = option(3, "declared help")

    document_fields(Probe)  # as register_method does: copies the docstring text, marked as such
    assert _fields_without_own_help(Probe) == ["documented", "plain"]
    assert field_help(Probe)["documented"] == "help from the docstring only."


def test_field_help_prefers_option_then_nearest_docstring() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Base(MethodConfig):
        """Base.

        Attributes:
            a, b: shared text
                that continues.
            c: base c.
        """

        a: int = 1
        b: int = 2
        c: int = 3

    @dataclass(frozen=True, kw_only=True)
    class Child(Base):
        """Child.

        Attributes:
            c: child c.
        """

        d: int = option(4, "from option")

    assert field_help(Child) == {
        "rank": MethodConfig.help_text("rank"), "a": "shared text that continues.",
        "b": "shared text that continues.", "c": "child c.", "d": "from option",
    }


def test_layer_methods_are_registry_entries() -> None:
    assert sorted(LAYER_METHODS) == registry("layer").names()
    assert {"factorized", "sltrain", "monarch"} <= set(LAYER_METHODS)
    for name in LAYER_METHODS:
        assert get_layer_class(name) is registry("layer").get(name).load()
    assert get_layer_class("SLTrain") is get_layer_class("sltrain")
    with pytest.raises(ValueError, match="unknown layer method 'galore'.*choose one of"):
        get_layer_class("galore")


def test_list_prints_every_kind_with_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed) == list(KINDS)
    assert [m["name"] for m in listed["adapter"]] == adapt.list_methods()
    assert [m["name"] for m in listed["layer"]] == sorted(LAYER_METHODS)
    for kind, methods in listed.items():
        for m in methods:
            assert m["summary"].strip(), f"{kind} {m['name']} has no one-line description"
            assert "\n" not in m["summary"]
    rslora = next(m for m in listed["adapter"] if m["name"] == "rslora")
    assert rslora["defaults"] == {"use_rslora": True}
    assert catalogue()["adapter"] == [(m["name"], m["summary"]) for m in listed["adapter"]]

    assert main(["list", "--kind", "layer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"layer ({len(LAYER_METHODS)})") and "adapter" not in out
    assert all(f"  {name} " in out for name in LAYER_METHODS)


def test_list_survives_an_empty_kind_and_reports_a_broken_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(registry_module._REGISTRIES, "healing", Registry("healing", "json"))
    monkeypatch.setitem(registry_module._REGISTRIES, "optimizer",
                        Registry("optimizer", "rankwise._no_such_module"))
    listed, errors = collect(list(KINDS))
    assert listed["healing"] == [] and listed["optimizer"] == []
    assert list(errors) == ["optimizer"] and "No module named" in errors["optimizer"]
    assert listed["adapter"]  # the other kinds are still listed
    assert "healing (0)\n  (none registered)" in format_table(listed)

    assert main(["list"]) == 1
    captured = capsys.readouterr()
    assert "could not load the optimizer methods" in captured.err
    assert "adapter (" in captured.out


def test_registry_retries_a_loader_that_failed() -> None:
    reg = Registry("toy", "rankwise._no_such_module")
    for _ in range(2):  # the failure is raised again, not hidden behind an empty registry
        with pytest.raises(ModuleNotFoundError):
            reg.names()


def test_top_level_names_reach_the_registry_and_config() -> None:
    import rankwise
    from rankwise.config import Config

    assert rankwise.catalogue is catalogue
    assert rankwise.registry.registry("adapter") is registry("adapter")
    assert rankwise.config.Config is Config
    assert issubclass(MethodConfig, Config)
