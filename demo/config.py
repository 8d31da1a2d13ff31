"""DemoConfig: the built-in world, the model shapes, and the training budget of every method."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adpa.demo.world import WorldConfig

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: int
    hidden: int
    heads: int


class Stage(BaseModel):
    """One stage-0 training (fixed hyperparameters: these make the world, they are not compared)."""

    model_config = ConfigDict(extra="forbid")
    steps: int
    lr: float
    batch_size: int = 32
    options: dict[str, Any] = Field(default_factory=dict, description="extra fields of the TRL config")


class Method(BaseModel):
    """A student method: an `adpa train` method name, the settings to try, and fixed options."""

    model_config = ConfigDict(extra="forbid")
    method: str
    grid: dict[str, list[Any]] = Field(
        description="config fields -> candidate values; every combination is trained and the best on the "
        "validation split is kept (give every method the same number of combinations)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="fixed fields of the method's config")
    teacher: Literal["teacher", "reference"] = Field("teacher", description="which service gives the signals")
    init_from: str | None = Field(
        None, description="start from another method's trained student (same world and seed, that method's chosen "
        "setting) instead of the SFT student: ADPA+ is ADPA from DCKD's student. Its steps count as this method's too"
    )
    steps: int | None = Field(None, ge=1, description="training steps (default: the config's `steps`)")
    settings_from: str | None = Field(
        None, description="train with another method's chosen setting instead of searching a grid of its own (a "
        "derived row, e.g. a matched-compute control; its `grid` must name the same fields)"
    )

    def candidates(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


class Search(BaseModel):
    """How each method's setting is chosen on the validation split (the same rule for every method)."""

    model_config = ConfigDict(extra="forbid")
    max_extensions: int = Field(
        0, ge=0, description="how many times a method's grid may grow one rung past an edge its best setting "
        "sits on (see adpa.demo.search); 0 = the grid as written"
    )
    select_on: Literal["greedy", "sampled", "greedy+sampled"] = Field(
        "greedy", description="validation score: mean greedy reward, mean sampled reward, or the mean of both (seed 0)"
    )


class PrimaryClaim(BaseModel):
    """A pre-registered claim: `better` beats `worse` on the test worlds' mean reward under `decoding`."""

    model_config = ConfigDict(extra="forbid")
    key: str
    better: str
    worse: str
    decoding: Literal["greedy", "sampled"]
    why: str = Field("", description="where the paper makes the claim and why this decoding")


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("lists", description="the world's name in reports and folder names")
    about: str = Field("", description="what the world is and why it is built so (printed in research reports)")
    world: WorldConfig = WorldConfig()
    teacher: Shape = Shape(layers=2, hidden=96, heads=4)
    student: Shape = Shape(layers=1, hidden=32, heads=2)
    teacher_sft: Stage = Stage(steps=600, lr=3e-3)
    teacher_dpo: Stage = Stage(steps=200, lr=5e-5, options={"beta": 0.1})
    student_sft: Stage = Stage(steps=400, lr=1e-2)
    beta: float = Field(0.1, description="advantage scale served by the teacher")
    steps: int = Field(200, description="training steps of every student method (ADPA+ splits them in two)")
    batch_size: int = Field(16, description="preference records per student step")
    max_new_tokens: int = Field(12, description="longest generated response")
    seeds: int = Field(1, ge=1, description="training seeds per method for the final table")
    worlds: int = Field(
        1, ge=1, description="stage-0 replicates: world r has world seed world.seed + r and its own teachers and SFT "
        "student (training seed r); settings are chosen on world 0's validation split only"
    )
    search: Search = Search()
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads of every student training, the SFT student's included (default: "
        "torch's choice; one in each worker when jobs > 1). The two teachers train first, alone on the machine, "
        "with torch's choice; the services always run with one"
    )
    jobs: int = Field(
        1, ge=1, description="student methods trained at once, each in its own worker process (its whole search, "
        "then its seeds); the table does not depend on it"
    )
    tuning_worlds: int = Field(
        0, ge=0, description="research runs: worlds that only choose settings (world seeds world.seed + t, t < "
        "tuning_worlds), never tested; the test worlds then have seeds world.seed + tuning_worlds + r. 0 = the "
        "settings are chosen on test world 0's validation split (the single-world demo)"
    )
    primary: list[PrimaryClaim] = Field(
        default_factory=list, description="pre-registered claims, each decided at the world level with Holm over "
        "all of them; everything else a run reports is exploratory"
    )
    methods: dict[str, Method] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _derived_rows_name_methods(self) -> DemoConfig:
        for name, method in self.methods.items():
            for source in (method.init_from, method.settings_from):
                if source is not None and (source not in self.methods or source == name):
                    raise ValueError(f"method {name!r} derives from {source!r}, which is not another method here")
            if method.init_from and self.methods[method.init_from].init_from:
                raise ValueError(f"method {name!r}: init_from must name a method that starts from the SFT student")
        for claim in self.primary:
            for side in (claim.better, claim.worse):
                if side not in self.methods and side not in ("SFT", "Teacher (DPO)", "Teacher SFT (reference)"):
                    raise ValueError(f"primary claim {claim.key}: {side!r} is not a method of this config")
        return self

    def method_steps(self, name: str) -> int:
        """Student steps of a method in all, its init_from method's included."""
        method = self.methods[name]
        own = method.steps or self.steps
        return own + (self.method_steps(method.init_from) if method.init_from else 0)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DemoConfig:
        data = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text()) or {}
        for key, value in (overrides or {}).items():
            data[key] = value
        return cls.model_validate(data)
