"""The shared Registry and Config base: naming rule, lookup errors, round trips, CLI generation."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from rankwise.config import Config, add_arguments, from_args, option
from rankwise.registry import Registry, canonical_name


def test_canonical_name_folds_dashes_and_case() -> None:
    assert canonical_name("SVD-LLM-update") == "svd_llm_update"
    assert canonical_name(" galore adamw ") == "galore_adamw"


def test_registry_resolves_dashed_names_and_rejects_bad_ones() -> None:
    reg = Registry("toy")

    @reg.register("low_rank", summary="a toy", rank=4)
    class LowRank:
        pass

    assert reg.get("low-rank").load() is LowRank
    assert dict(reg.get("LOW_RANK").defaults) == {"rank": 4}
    assert "low-rank" in reg and "high-rank" not in reg
    with pytest.raises(ValueError, match="did you mean 'low_rank'"):
        reg.get("low_rnk")
    with pytest.raises(ValueError, match="lower_snake_case"):
        reg.register("Bad-Name", LowRank)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("low_rank", object())


def test_lazy_target_imports_on_first_use() -> None:
    reg = Registry("toy")
    reg.register("ordered", "collections:OrderedDict")
    from collections import OrderedDict

    entry = reg.get("ordered")
    assert entry.load() is OrderedDict
    assert entry.describe()  # first docstring line of the target


@dataclass(frozen=True, kw_only=True)
class _Toy(Config):
    rank: int = option(8, "adapter rank")
    mode: Literal["a", "b"] = option("a", "which mode")
    targets: tuple[str, ...] = option(("q", "v"), "module names")
    merge: bool = option(False, "merge after training")
    secret: float = option(1.0, "python only", cli=False)

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


def test_config_round_trip_and_validation() -> None:
    cfg = _Toy(rank=4, targets=("k",))
    again = _Toy.from_dict(cfg.to_dict())  # JSON lists come back as tuples
    assert again == cfg
    with pytest.raises(TypeError, match=r"no option\(s\) \['rnak'\]"):
        _Toy.from_dict({"rnak": 3})
    with pytest.raises(ValueError, match="mode must be one of"):
        _Toy(mode="c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank must be >= 1"):
        cfg.replace(rank=0)
    with pytest.raises(TypeError):
        _Toy(4)  # type: ignore[misc]  (keyword-only)


def test_option_check_runs_on_every_construction() -> None:
    seen: list[tuple[str, object]] = []

    def positive(name: str, value: object) -> None:
        seen.append((name, value))
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    @dataclass(frozen=True, kw_only=True)
    class Checked(Config):
        width: int = option(2, "a positive width", check=positive)

    @dataclass(frozen=True, kw_only=True)
    class Child(Checked):  # an inherited field keeps its check
        depth: int = option(1, "unchecked")

    assert Child(width=3).width == 3 and seen == [("width", 3)]
    for bad in (0, -1, "3"):
        with pytest.raises(ValueError, match="width must be a positive int"):
            Child(width=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width must be a positive int"):
        Checked().replace(width=0)


def test_every_adapter_dropout_is_validated() -> None:
    from rankwise import adapt

    with_dropout = [n for n in adapt.list_methods() if "dropout" in adapt.build_config(n).to_dict()]
    assert len(with_dropout) >= 15
    for name in with_dropout:
        assert adapt.build_config(name, dropout=0.5).dropout == 0.5
        for bad in (1.0, -0.1, "0.1"):
            with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
                adapt.build_config(name, dropout=bad)


def test_cli_flags_generated_from_fields() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Toy, defaults={"rank": 16})
    ns = parser.parse_args(["--mode", "b", "--targets", "q", "k", "--merge"])
    cfg = from_args(_Toy, ns)
    assert cfg == _Toy(rank=16, mode="b", targets=("q", "k"), merge=True)
    assert "--secret" not in parser.format_help()
    assert "adapter rank (default: 16)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
