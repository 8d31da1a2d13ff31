"""docker compose without Docker: the compose files and the images checked offline, and what the
containers would run, run here as plain processes.

No Docker engine exists on these machines, so:
- docker-compose.yml, alone and merged with deploy/compose.cpu.yaml and/or deploy/compose.tls.yaml,
  with each profile, is validated against the Compose specification (check-jsonschema's
  vendor.compose-spec schema); the GPU services' commands parse into valid settings;
- deploy/Dockerfile passes hadolint;
- the CPU stack's entrypoints, commands and healthchecks run as processes, with the environment
  compose would give them (.env.example interpolated as compose does, the image's ENV, the service's
  `environment`), in the order their `depends_on` conditions say, on the tiny models: the reference
  becomes healthy by its own healthcheck, the teacher answers an advantage request, the trainer
  profile trains against it, the Ray profile serves the application, the TLS override serves
  grpcs://, and SIGTERM drains each in time.

The compose model is built here the way Compose builds it: each file is interpolated, then the
override is merged over the base (mappings by key, `command`/`entrypoint`/`healthcheck.test`
replaced, `volumes` by container path, `!reset` removes), then services outside the enabled profiles
are left out. The override files alone cannot be given to check-jsonschema (its YAML loader knows no
`!reset` tag), so the merged models are validated, which is what Compose itself validates; the
base file is also validated as written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from adpa.services.launch import free_port

from .conftest import RAY_ON_SHARED_CORES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "deploy" / "compose.cpu.yaml"
TLS_OVERRIDE = ROOT / "deploy" / "compose.tls.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BIN = Path(sys.executable).parent
PROFILES = [(), ("trainer",), ("ray",)]
SERVE_SERVICES = ("reference", "teacher", "teacher-ray")


# -- Compose's YAML tags, interpolation and merge rules ---------------------------------------------


class _Reset:
    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


@dataclass
class Override:
    value: object


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` (drop the value) and `!override` (replace, not merge)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: Override(
        loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)
    ),
)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


class InterpolationError(ValueError):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*)|\{(?P<braced>[^}]*)\})")
_BRACED = re.compile(r"(?P<name>[_a-zA-Z][_a-zA-Z0-9]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in `value`: $$ is a literal $; $VAR and ${VAR} ("" when
    unset); ${VAR:-default} (unset or empty) and ${VAR-default} (unset); ${VAR:?message} and
    ${VAR?message} raise; ${VAR:+alt} and ${VAR+alt}. Keys are not interpolated."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise InterpolationError(f"invalid interpolation format: ${{{match['braced']}}}")
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        is_set, current = name in env, env.get(name, "")
        usable = is_set and (current != "" or not op.startswith(":")) if op else is_set
        if op is None:
            return current
        if op in (":-", "-"):
            return current if usable else interpolate(arg, env)
        if op in (":?", "?"):
            if not usable:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return current
        return interpolate(arg, env) if usable else ""  # :+ and +

    return _VARIABLE.sub(substitute, value)


def parse_env_file(path: Path) -> dict[str, str]:
    """A .env file as Compose reads it (KEY=VALUE lines, # comments, optional quotes)."""
    env = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[_a-zA-Z][_a-zA-Z0-9]*", key.strip()):
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if value[:1] in ("'", '"') and value[-1:] == value[:1]:
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        env[key.strip()] = value
    return env


def _strip_resets(value):
    if isinstance(value, dict):
        return {k: _strip_resets(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_strip_resets(v) for v in value if v is not RESET]
    return value.value if isinstance(value, Override) else value


REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}


def _volume_target(spec: str) -> str:
    return spec.split(":")[1] if ":" in spec else spec


def merge(base, override, path: tuple[str, ...] = ()):
    """Compose's merge of one file's value over another's, within a service (`path` from it)."""
    if override is RESET:
        return RESET
    if isinstance(override, Override):
        return _strip_resets(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is RESET:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value, (*path, key))
            else:
                merged[key] = _strip_resets(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if path in REPLACED:
            return _strip_resets(override)
        if path == ("volumes",):  # one mount per container path: the override's wins
            targets = {_volume_target(v) for v in override}
            return [v for v in base if _volume_target(v) not in targets] + _strip_resets(override)
        return base + [v for v in _strip_resets(override) if v not in base]
    return _strip_resets(override)


def merge_files(base: dict, override: dict) -> dict:
    model = {k: v for k, v in base.items() if k != "services"}
    for key, value in override.items():
        if key != "services":
            model[key] = merge(model.get(key), value) if isinstance(model.get(key), dict) else _strip_resets(value)
    services = dict(base.get("services", {}))
    for name, service in override.get("services", {}).items():
        services[name] = merge(services[name], service) if name in services else _strip_resets(service)
    model["services"] = services
    return model


def interpolation_env(token: str | None = None, **extra: str) -> dict[str, str]:
    """.env.example as the project's .env, and the shell's variables over it (as Compose does): here
    only ADPA_AUTH_TOKEN, which .env.example deliberately leaves empty."""
    env = parse_env_file(ENV_EXAMPLE)
    if token is not None:
        env["ADPA_AUTH_TOKEN"] = token
    return {**env, **extra}


def compose_model(env: dict[str, str], *, cpu: bool, profiles: tuple[str, ...] = (), tls: bool = False) -> dict:
    """The project as `docker compose -f docker-compose.yml [-f deploy/compose.cpu.yaml] [-f
    deploy/compose.tls.yaml] [--profile P]` sees it: each file interpolated, then merged in order, then
    the services of the enabled profiles."""
    model = interpolate(load_yaml(COMPOSE), env)
    for override in [CPU_OVERRIDE] * cpu + [TLS_OVERRIDE] * tls:
        model = merge_files(model, interpolate(load_yaml(override), env))
    model = _strip_resets(model)
    model["services"] = {
        name: service for name, service in model["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }
    return model


def parse_duration(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a Compose duration: {text!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit] for n, unit in parts)


# -- the Dockerfile, read as far as the tests need -------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_stages(build_args: dict[str, str] | None = None) -> tuple[dict[str, Stage], dict[str, str]]:
    """The stages of deploy/Dockerfile (instruction, argument) and its global ARGs (with `build_args`)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    global_args: dict[str, str] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        instruction, argument = instruction.upper(), re.sub(r"\s+", " ", argument.strip())
        if instruction == "FROM":
            image, _, name = argument.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image)
            current = stages[name] = Stage(name, image)
        elif current is None and instruction == "ARG":
            key, _, default = argument.partition("=")
            global_args[key] = (build_args or {}).get(key, default)
        elif current is not None:
            current.instructions.append((instruction, argument))
    return stages, global_args


def stage_chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    chain = [stages[target]]
    while chain[-1].parent in stages:
        chain.append(stages[chain[-1].parent])
    return chain[::-1]


def _last(chain: list[Stage], instruction: str) -> str | None:
    found = [arg for stage in chain for ins, arg in stage.instructions if ins == instruction]
    return found[-1] if found else None


@dataclass
class Image:
    """What `docker run` would take from a built target: ENV, ENTRYPOINT, CMD, HEALTHCHECK, USER, WORKDIR."""

    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: str | None
    user: str | None
    workdir: str | None
    stop_signal: str | None


def image_of(target: str, variant: str, base_path: str) -> Image:
    stages, _ = dockerfile_stages({"VARIANT": variant})
    chain = stage_chain(stages, target)
    env = {"PATH": base_path}  # the base image's PATH: here, the host's
    for stage in chain:
        for instruction, argument in stage.instructions:
            if instruction == "ENV":
                for key, value in re.findall(r"(\w+)=(\S+)", argument):
                    env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
    entrypoint, cmd = _last(chain, "ENTRYPOINT"), _last(chain, "CMD")
    return Image(env, json.loads(entrypoint) if entrypoint else [], json.loads(cmd) if cmd else [],
                 _last(chain, "HEALTHCHECK"), _last(chain, "USER"), _last(chain, "WORKDIR"),
                 _last(chain, "STOPSIGNAL"))


def tool(name: str) -> str:
    """A command-line tool of the dev extra (check-jsonschema, hadolint), beside this Python or on PATH."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return str(path)


# -- fast checks ------------------------------------------------------------------------------------


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d} ${UNSET-d}", env) == "x d d  d"
    assert interpolate("$SET ${SET} $$SET $$$SET ${UNSET}", env) == "x x $SET $x "
    assert interpolate("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt} ${UNSET+alt}", env) == "alt  alt "
    assert interpolate("${SET:?must} ${EMPTY?fine}", env) == "x "
    with pytest.raises(InterpolationError, match="required variable EMPTY is missing a value: must be set"):
        interpolate("${EMPTY:?must be set}", env)
    with pytest.raises(InterpolationError, match="UNSET"):
        interpolate("${UNSET?}", env)
    assert parse_duration("1m30s") == 90 and parse_duration("600s") == 600
    # merge rules: mappings by key, commands replaced, volumes by target, !reset removes
    base = {"command": ["a"], "environment": {"A": "1"}, "volumes": ["x:/m:ro", "y:/c"], "deploy": {"r": [1]}}
    over = {"command": ["b"], "environment": {"B": "2"}, "volumes": ["z:/m"], "deploy": {"r": RESET}}
    assert merge(base, over) == {"command": ["b"], "environment": {"A": "1", "B": "2"},
                                 "volumes": ["y:/c", "z:/m"], "deploy": {}}


def test_env_example_leaves_the_token_to_the_user_and_compose_refuses_without_it():
    env = parse_env_file(ENV_EXAMPLE)
    assert env["ADPA_AUTH_TOKEN"] == ""  # no secret is committed
    assert not any("$" in value for value in env.values())  # plain values: Compose and this parser agree
    for cpu in (False, True):
        with pytest.raises(InterpolationError, match="ADPA_AUTH_TOKEN is missing a value: set ADPA_AUTH_TOKEN in .env"):
            compose_model(env, cpu=cpu)
    # every variable the compose files read is in .env.example, set or as a commented-out line
    used = set()
    for path in (COMPOSE, CPU_OVERRIDE, TLS_OVERRIDE):
        lines = [line.split(" #")[0] for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        code = "\n".join(lines)
        used |= {m[1] for m in re.finditer(r"\$\{(\w+)(?=[:}?+-])", code)}
    documented = set(env) | set(re.findall(r"^# ([A-Z_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert used and not used - documented, f"not in .env.example: {used - documented}"


def test_compose_models_are_valid_against_the_compose_spec(tmp_path):
    env = interpolation_env("t0ken")
    files = [str(COMPOSE)]  # the file as written (its ${...} strings validate as strings)
    for cpu in (False, True):
        for tls in (False, True):
            for profiles in PROFILES:
                name = f"compose{'-cpu' * cpu}{'-tls' * tls}-{'-'.join(profiles) or 'default'}.json"
                (tmp_path / name).write_text(json.dumps(compose_model(env, cpu=cpu, profiles=profiles, tls=tls)))
                files.append(str(tmp_path / name))
    check = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, *files], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the validator does refuse an invalid model: GPUs asked for under a key the spec does not know
    bad = compose_model(env, cpu=False)
    bad["services"]["teacher"]["deploy"]["resources"]["reservations"]["gpus"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = subprocess.run([*check, str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "gpus" in result.stdout, result.stdout + result.stderr


def test_the_compose_file_has_what_the_issue_asks():
    env = interpolation_env("t0ken")
    model = compose_model(env, cpu=False, profiles=("trainer", "ray"))
    services = model["services"]
    assert set(services) == {"reference", "teacher", "trainer", "teacher-ray"}
    ref, teacher, trainer, ray = (services[n] for n in ("reference", "teacher", "trainer", "teacher-ray"))
    # the teacher waits for a healthy reference and reaches it by service name, on its gRPC port
    assert teacher["depends_on"] == {"reference": {"condition": "service_healthy"}}
    assert teacher["environment"]["ADPA_REFERENCE"] == f"grpc://reference:{ref['environment']['ADPA_PORT']}"
    assert teacher["environment"]["ADPA_REFERENCE_TOKEN"] == teacher["environment"]["ADPA_AUTH_TOKEN"] == "t0ken"
    # GPUs: reserved per service through deploy.resources, device ids from .env
    for name, gpu_var in (("reference", "REFERENCE_GPU"), ("teacher", "TEACHER_GPU"), ("trainer", "TRAINER_GPU")):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [env[gpu_var]], "capabilities": ["gpu"]}, name
    other = compose_model(interpolation_env("t0ken", TEACHER_GPU="3"), cpu=False)["services"]["teacher"]
    assert other["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert ray["deploy"]["resources"]["reservations"]["devices"][0]["count"] == env["RAY_GPU_COUNT"]
    # published ports: on the host's loopback unless PUBLISH_ADDRESS says otherwise
    assert teacher["ports"] == ["127.0.0.1:50051:50051", "127.0.0.1:8080:8080"]
    assert ref["ports"] == ["127.0.0.1:50052:50052", "127.0.0.1:8082:8082"]
    opened = compose_model(interpolation_env("t0ken", PUBLISH_ADDRESS="0.0.0.0"), cpu=False)["services"]
    assert opened["teacher"]["ports"] == ["0.0.0.0:50051:50051", "127.0.0.1:8080:8080"]  # gRPC only
    assert all(port.startswith("127.0.0.1:") for port in opened["reference"]["ports"])
    # models and the hub cache as volumes
    for name in ("reference", "teacher", "trainer", "teacher-ray"):
        assert {"./models:/models:ro", "hub-cache:/cache/huggingface"} <= set(services[name]["volumes"]), name
    assert {"hub-cache", "runs"} <= set(model["volumes"])
    # health: the image's check, with a start period long enough for loading; stop: drain within the grace
    image = image_of("serve", "cuda", "/usr/bin")
    for name in SERVE_SERVICES:
        service = services[name]
        assert service["healthcheck"]["test"] == ["CMD", *json.loads(image.healthcheck.split(" CMD ", 1)[1])]
        assert parse_duration(service["healthcheck"]["start_period"]) >= 300
        assert service["stop_signal"] == image.stop_signal == "SIGTERM"
        grace = float(service["environment"]["ADPA_GRACE_PERIOD_S"])
        assert parse_duration(service["stop_grace_period"]) >= grace + 5 + 5, name  # drain + HTTP join + margin
        assert service["environment"]["ADPA_HOST"] == "0.0.0.0" and service["init"] is True
    # profiles: the trainer trains against `teacher`; the Ray application is its own profile
    assert trainer["profiles"] == ["trainer"] and ray["profiles"] == ["ray"]
    assert trainer["depends_on"] == {"teacher": {"condition": "service_healthy"}}
    argv = trainer["command"]
    assert argv[:2] == ["train", "adpa"] and argv[argv.index("--teacher") + 1] == "grpc://teacher:50051"
    assert argv[argv.index("--teacher_token") + 1] == "t0ken"
    assert ray["command"][:2] == ["serve", "--ray"]
    # Ray replicas inherit the environment: the reference deployment would read ADPA_REFERENCE as its own
    assert "ADPA_REFERENCE" not in ray["environment"] and "--reference" in ray["command"]
    assert set(compose_model(env, cpu=False)["services"]) == {"reference", "teacher"}  # no profile: the pair


def test_compose_fallbacks_are_the_servers_defaults():
    """A setting left out of .env gets `adpa serve`'s own default, not a second one."""
    from adpa.services.config import ServeConfig

    text = COMPOSE.read_text()
    fallbacks = dict(re.findall(r"ADPA_(\w+): \$\{\w+:-([^}]*)\}", text))
    assert {"DTYPE", "MAX_INFLIGHT", "MAX_BATCH_TOKENS", "LOGITS_BUDGET_MB", "GRACE_PERIOD_S", "BETA"} <= set(fallbacks)
    for name, fallback in fallbacks.items():
        if name in ("MODEL",):  # no default in ServeConfig: a path in the models volume
            continue
        default = ServeConfig.model_fields[name.lower()].default
        if default is None:  # unset: an empty variable is read as unset
            assert fallback == "", (name, fallback)
            continue
        assert type(default)(fallback) == default, (name, fallback, default)
    for line in ENV_EXAMPLE.read_text().splitlines():  # the commented limits in .env.example say the same
        if m := re.fullmatch(r"# (MAX_INFLIGHT|MAX_BATCH_TOKENS|LOGITS_BUDGET_MB|MAX_MESSAGE_MB|LOG_LEVEL)=(\S+)",
                             line):
            assert m[2] == fallbacks[m[1]], line


def test_the_gpu_commands_parse_into_valid_settings(monkeypatch):
    """The GPU services' commands (not run here: no GPU, no real models) with their environment give
    valid settings: `adpa serve`'s ServeConfig (and, for --ray, what check_settings asks) and
    `adpa train`'s arguments."""
    from trl import TrlParser

    from adpa.cli import build_parser
    from adpa.config import settings_from_args
    from adpa.services.config import ServeConfig
    from adpa.services.ray.launch import check_settings
    from adpa.training.run import RunArguments, config_class

    services = compose_model(interpolation_env("t0ken"), cpu=False, profiles=("trainer", "ray"))["services"]
    image = image_of("serve", "cuda", "/usr/bin")
    for name in SERVE_SERVICES:
        for key in [k for k in os.environ if k.startswith("ADPA_")]:
            monkeypatch.delenv(key)
        for key, value in {**image.env, **services[name]["environment"]}.items():
            if key.startswith("ADPA_"):
                monkeypatch.setenv(key, str(value))
        argv = services[name]["command"]
        assert image.entrypoint == ["adpa"] and argv[0] == "serve"
        config = settings_from_args(ServeConfig, build_parser().parse_args(argv))
        assert config.host == "0.0.0.0" and config.auth_token.get_secret_value() == "t0ken"
        assert config.port == int(services[name]["environment"]["ADPA_PORT"])
        if config.ray:
            check_settings(config)
            assert config.reference == "/models/sft" and config.ray_gpus_per_replica == 1
        elif config.role == "teacher":
            assert config.remote_reference and config.reference_token.get_secret_value() == "t0ken"
    argv = services["trainer"]["command"]
    assert argv[0] == "train"
    # as `adpa train METHOD` passes them on; --use_cpu only because this machine has no GPU for --bf16
    run, config = TrlParser((RunArguments, config_class(argv[1]))).parse_args_and_config(
        ["--method", argv[1], *argv[2:], "--use_cpu", "true"])
    assert run.model == "/models/student-sft" and config.teacher == "grpc://teacher:50051" and config.bf16
    assert config.output_dir == "/runs/adpa" and config.max_steps == 1000


def test_the_cpu_override_serves_tiny_models_without_gpus():
    env = interpolation_env("t0ken")
    for profiles in PROFILES:
        services = compose_model(env, cpu=True, profiles=profiles)["services"]
        for name, service in services.items():
            assert "devices" not in service.get("deploy", {}).get("resources", {}).get("reservations", {}), name
            assert service["build"]["args"]["VARIANT"] == "cpu" and service["image"].endswith("-cpu"), name
            for dependency in service.get("depends_on", {}):  # never on a service of a disabled profile
                assert dependency in services, (name, dependency)
    services = compose_model(env, cpu=True, profiles=("trainer",))["services"]
    assert services["tiny-models"]["entrypoint"] == ["python", "/opt/adpa/tiny_stack.py"]
    assert services["reference"]["environment"]["ADPA_MODEL"] == "/models/tiny/reference"
    assert services["teacher"]["environment"]["ADPA_REFERENCE"] == "grpc://reference:50052"  # kept from the base
    assert services["teacher"]["depends_on"] == {
        "reference": {"condition": "service_healthy"},
        "tiny-models": {"condition": "service_completed_successfully"},
    }
    assert services["teacher"]["volumes"] == ["hub-cache:/cache/huggingface", "tiny-models:/models:ro"]
    # the TLS override touches the teacher only (Ray's gRPC proxy serves no TLS: check_settings refuses it)
    plain, tls = (compose_model(env, cpu=False, profiles=("ray",), tls=t)["services"] for t in (False, True))
    assert {n for n in plain if plain[n] != tls[n]} == {"teacher"}
    assert tls["teacher"]["environment"]["ADPA_TLS_CERT"] == "/tls/tls.crt"
    assert "./tls:/tls:ro" in tls["teacher"]["volumes"]


def test_the_dockerfile_passes_hadolint(tmp_path):
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # every rule ignored inline is named, with its reason, in the comment lines right above it
    lines = DOCKERFILE.read_text().splitlines()
    ignored = [(i, m[1]) for i, line in enumerate(lines) if (m := re.match(r"# hadolint ignore=(\S+)", line))]
    assert {rule for _, rule in ignored} == {"DL3006", "DL3008", "DL3064"}
    for i, rule in ignored:
        assert rule in " ".join(lines[max(0, i - 3):i]), f"line {i + 1}: {rule} ignored without a reason"
    # and hadolint does fail where it should
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install requests\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "DL3006" in result.stdout and "DL3013" in result.stdout


def test_the_images_targets_users_layers_and_signals():
    text = DOCKERFILE.read_text()
    for variant in ("cuda", "cpu"):
        stages, args = dockerfile_stages({"VARIANT": variant})
        assert stage_chain(stages, "serve")[0].name == f"os-{variant}"
        for target in ("serve", "trainer"):
            image = image_of(target, variant, "/usr/bin")
            assert image.user and image.user.split(":")[0].isdigit() and int(image.user.split(":")[0]) >= 1000
            assert image.entrypoint == ["adpa"] and image.stop_signal == "SIGTERM"
            assert image.env["HF_HOME"] == "/cache/huggingface" and image.env["PATH"].startswith("/opt/venv/bin:")
        assert image_of("serve", variant, "/usr/bin").env["ADPA_HOST"] == "0.0.0.0"
        assert image_of("trainer", variant, "/usr/bin").healthcheck == "NONE"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and args["PYTHON_IMAGE"].startswith("python:3.12-slim")
    # dependencies from pyproject.toml in layers before any source copy; the source only in the wheel stage
    stages, _ = dockerfile_stages()
    copies = [(s.name, arg) for s in stages.values() for ins, arg in s.instructions if ins == "COPY"]
    assert copies[0] == ("base", "pyproject.toml deploy/requirements.py /tmp/adpa/")
    assert [name for name, arg in copies if arg.startswith(". ")] == ["wheel"]
    for target in ("serve-deps", "trainer-deps"):
        assert any("requirements.py" in arg and "pip install -r" in arg for _, arg in stages[target].instructions)
    assert stages["serve"].parent == "serve-deps" and stages["trainer"].parent == "trainer-deps"
    # no secret in the image: no token-like ARG/ENV, and .dockerignore keeps .env files out of the context
    for stage in stages.values():
        for ins, arg in stage.instructions:
            if ins in ("ARG", "ENV"):
                assert not re.search(r"(AUTH|SECRET|PASSWORD|HF_TOKEN|API_KEY)", arg), arg
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".env.*", ".venv", ".git", "runs", "models"} <= set(ignored)
    # the KubeRay manifest's image is this file's serve target, tagged as compose tags it
    kuberay = (ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()
    assert "docker build -f deploy/Dockerfile --target serve" in kuberay and " AS serve\n" in text
    image = compose_model(interpolation_env("t0ken"), cpu=False)["services"]["teacher"]["image"]
    assert f"image: {image}" in kuberay


def test_requirements_come_from_pyproject_without_torch():
    run = [sys.executable, str(ROOT / "deploy" / "requirements.py"), str(ROOT / "pyproject.toml")]
    base = subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()
    serve = subprocess.run([*run, "ray"], capture_output=True, text=True, check=True).stdout.split()
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert base == [r for r in project["dependencies"] if not r.startswith("torch")]
    assert serve == base + project["optional-dependencies"]["ray"]
    bad = subprocess.run([*run, "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown extra(s) ['nope']" in bad.stderr


# -- the containers' processes, run here ------------------------------------------------------------


def _compose_v2() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
        if version.returncode == 0 and re.match(r"v?2\.", version.stdout.strip()):
            return command
    return None


@pytest.mark.skipif(_compose_v2() is None, reason="no Compose v2 binary here (docker compose / docker-compose 2.x)")
def test_docker_compose_config_accepts_every_combination(tmp_path):
    """Where a real Compose v2 is installed: `docker compose config` for each file set and profile."""
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text().replace("ADPA_AUTH_TOKEN=", "ADPA_AUTH_TOKEN=t0ken"))
    for files in ([COMPOSE], [COMPOSE, CPU_OVERRIDE], [COMPOSE, TLS_OVERRIDE], [COMPOSE, CPU_OVERRIDE, TLS_OVERRIDE]):
        for profiles in PROFILES:
            argv = [*_compose_v2(), "--project-directory", str(ROOT), "--env-file", str(tmp_path / ".env")]
            argv += [a for f in files for a in ("-f", str(f))] + [a for p in profiles for a in ("--profile", p)]
            result = subprocess.run([*argv, "config", "--quiet"], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (files, profiles, result.stderr)


# Two shared cores: the processes get one torch thread each (test-only additions to their environment).
THREADS_ENV = {"OMP_NUM_THREADS": "1", "ADPA_TORCH_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Stack:
    """The services of a compose model as processes on this host, in `depends_on` order.

    What must differ on the host is rewritten, nothing else: container paths become folders (each
    volume a folder under `volumes`, /opt/adpa the repository's deploy/, /opt/venv this virtualenv,
    the user's home a temporary folder); ADPA_HOST 0.0.0.0 becomes 127.0.0.1; each service's
    container ports (ADPA_PORT, ADPA_HTTP_PORT) become free loopback ports, and `service:port`
    addresses the matching 127.0.0.1 ones.
    """

    def __init__(self, model: dict, workdir: Path, volumes: Path, extra_env: dict[str, str] | None = None):
        self.services = model["services"]
        self.workdir, self.volumes, self.extra_env = workdir, volumes, extra_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.ports: dict[str, dict[str, int]] = {}  # service -> container port -> host port
        for name, service in self.services.items():
            env = service.get("environment", {})
            self.ports[name] = {env[k]: free_port() for k in ("ADPA_PORT", "ADPA_HTTP_PORT") if k in env}
        self.addresses = {f"{name}:{port}": f"127.0.0.1:{host}"
                          for name, ports in self.ports.items() for port, host in ports.items()}

    def host_port(self, name: str, variable: str) -> int:
        return self.ports[name][self.services[name]["environment"][variable]]

    def _paths(self, name: str) -> dict[str, Path]:
        paths = {"/opt/adpa": ROOT / "deploy", "/opt/venv": Path(sys.prefix), "/home/adpa": self.workdir / "home"}
        for spec in self.services[name].get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith((".", "/")):  # a bind mount: the host folder must exist
                host = (ROOT / source).resolve()
                assert host.is_dir(), f"{name}: bind mount source {host} does not exist"
            else:  # a named volume: one folder per volume, shared by the services that mount it
                host = self.volumes / source
                host.mkdir(parents=True, exist_ok=True)
            paths[target] = host
        return paths

    def _host(self, value: str, paths: dict[str, Path]) -> str:
        for address, local in self.addresses.items():
            value = re.sub(rf"(?<=//){re.escape(address)}\b", local, value)
        for container, host in sorted(paths.items(), key=lambda item: -len(item[0])):
            value = re.sub(rf"(?<![\w/.]){re.escape(container)}(?=/|:|$)", str(host), value)
        return value

    def process(self, name: str) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and working directory of `name`'s container, as a process here."""
        service = self.services[name]
        variant = service["build"]["args"]["VARIANT"]
        image = image_of(service["build"]["target"], variant, os.environ.get("PATH", "/usr/bin:/bin"))
        paths = self._paths(name)
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        # an `entrypoint` in the service also clears the image's CMD (as docker does)
        argv = service.get("entrypoint", image.entrypoint) + service.get(
            "command", [] if "entrypoint" in service else image.cmd)
        env = {"HOME": "/home/adpa", **image.env, **{k: str(v) for k, v in service.get("environment", {}).items()}}
        env = {k: self._host(v, paths) for k, v in env.items()}
        for variable in ("ADPA_PORT", "ADPA_HTTP_PORT"):
            if variable in env:
                env[variable] = str(self.ports[name].setdefault(env[variable], free_port()))  # also the image's
        if env.get("ADPA_HOST") == "0.0.0.0":
            env["ADPA_HOST"] = "127.0.0.1"
        workdir = Path(self._host(image.workdir or "/", paths))
        workdir.mkdir(parents=True, exist_ok=True)
        return [self._host(a, paths) for a in argv], {**env, **THREADS_ENV, **self.extra_env}, workdir

    def healthcheck(self, name: str) -> subprocess.CompletedProcess:
        check = self.services[name]["healthcheck"]
        assert check["test"][0] == "CMD", check
        _, env, workdir = self.process(name)
        paths = self._paths(name)
        argv = [self._host(a, paths) for a in check["test"][1:]]
        return subprocess.run(argv, env=env, cwd=workdir, capture_output=True, text=True,
                              timeout=parse_duration(check["timeout"]) + 10)

    def start(self, name: str) -> None:
        """Start `name` once its dependencies meet their conditions (starting them first)."""
        if name in self.procs:
            return
        for dependency, spec in self.services[name].get("depends_on", {}).items():
            self.start(dependency)
            if spec["condition"] == "service_completed_successfully":
                assert self.wait(dependency, timeout=180) == 0, self.tail(dependency)
            elif spec["condition"] == "service_healthy":
                self.wait_healthy(dependency)
        argv, env, workdir = self.process(name)
        self.logs[name] = self.workdir / f"{name}.log"
        with open(self.logs[name], "wb") as log:
            self.procs[name] = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout)

    def wait_healthy(self, name: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the service's healthcheck until it passes. Compose would wait start_interval (5 s) between
        tries during the start period; here 0.5 s, to keep the test short."""
        check = self.services[name]["healthcheck"]
        deadline = time.monotonic() + min(timeout, parse_duration(check["start_period"]))
        while True:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.procs[name].returncode}:\n{self.tail(name)}")
            result = self.healthcheck(name)
            if result.returncode == 0:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not healthy: {result.stderr}\n{self.tail(name)}")
            time.sleep(0.5)

    def tail(self, name: str, chars: int = 4000) -> str:
        return self.logs[name].read_text(errors="replace")[-chars:] if name in self.logs else ""

    def stop(self, name: str) -> int | None:
        """`docker compose stop`: the service's stop signal, then SIGKILL after its stop_grace_period."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(getattr(signal, self.services[name].get("stop_signal", "SIGTERM")))
            try:
                proc.wait(parse_duration(self.services[name].get("stop_grace_period", "10s")))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None  # killed: did not drain in time
        return proc.returncode

    def kill_all(self) -> None:
        """Cleanup, also after a failure: every process group started here, by its PID."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: also children a killed server left behind
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """The named volumes, shared by the tests below (as by `docker compose` runs of one project)."""
    return tmp_path_factory.mktemp("volumes")


def _advantage_request(endpoint: str, token: str, tokenizer_path: Path, **client_options):
    import torch
    from transformers import AutoTokenizer

    from adpa.client import TeacherClient
    from adpa.protocol import SupportSpec

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "sort red cat dog"}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + tokenizer(" cat dog red thanks </s>", add_special_tokens=False)["input_ids"]
    p = len(prompt_ids)
    with TeacherClient(endpoint, token=token, timeout=60, **client_options) as client:
        info = client.check_compatible(tokenizer)  # same tokenizer hash and vocabulary
        answer = client.score([ids], [(p - 1, len(ids) - 1)], signal="advantage", support=SupportSpec("topk", k=4))
    assert info.role == "teacher" and info.reference is not None
    assert answer.signal == "advantage" and answer.reference == info.reference and answer.model == info.model
    assert answer.values.shape == (len(ids) - p, 4) and answer.indices.shape == (len(ids) - p, 4)
    assert torch.isfinite(answer.values).all() and answer.values.abs().sum() > 0  # two different tiny models
    return info, answer, ([ids], [(p - 1, len(ids) - 1)])


@pytest.mark.slow
def test_the_cpu_stack_runs_as_compose_would_run_it(tmp_path, volumes):
    """`docker compose -f docker-compose.yml -f deploy/compose.cpu.yaml --profile trainer up trainer`,
    with its processes run here; then `docker compose stop`."""
    import grpc

    from adpa.client import TeacherClient

    from .conftest import metric_value

    token = secrets.token_hex(16)
    stack = Stack(compose_model(interpolation_env(token), cpu=True, profiles=("trainer",)), tmp_path, volumes)
    try:
        failing = stack.healthcheck("reference")  # nothing listens yet: the check must fail
        assert failing.returncode == 1 and "readyz" in failing.stderr, failing
        stack.start("teacher")  # tiny-models (to completion), the reference (to healthy), the teacher
        stack.wait_healthy("teacher")
        assert "tiny models teacher, reference, student" in stack.tail("tiny-models") or \
            "already in" in stack.tail("tiny-models")
        grpc_health = stack.process("reference")[1] | {"ADPA_HTTP_PORT": "0"}  # the probe's gRPC fallback
        result = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=grpc_health,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "adpa.v1.Scorer: SERVING" in result.stdout, result

        endpoint = f"grpc://127.0.0.1:{stack.host_port('teacher', 'ADPA_PORT')}"
        _advantage_request(endpoint, token, volumes / "tiny-models" / "tiny" / "student")
        with TeacherClient(endpoint, timeout=30) as anonymous, pytest.raises(grpc.RpcError) as refused:
            anonymous.info()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the token from .env is enforced

        http = stack.host_port("teacher", "ADPA_HTTP_PORT")
        before = metric_value(http, "adpa_requests_total", transport="grpc", method="Score", code="OK")
        stack.start("trainer")
        assert stack.wait("trainer", timeout=300) == 0, stack.tail("trainer")
        out = volumes / "runs" / "tiny-adpa"
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file(), stack.tail("trainer")
        assert "'loss'" in stack.tail("trainer", 20000), stack.tail("trainer")
        after = metric_value(http, "adpa_requests_total", transport="grpc", method="Score", code="OK")
        assert after > before  # the trainer's signals came from the teacher service

        # `docker compose stop`: SIGTERM, and each server drains and exits 0 within stop_grace_period
        assert stack.stop("teacher") == 0, stack.tail("teacher")
        assert stack.stop("reference") == 0, stack.tail("reference")
    finally:
        stack.kill_all()


@pytest.mark.slow
def test_the_ray_profile_serves_the_application(tmp_path, volumes):
    """`docker compose -f docker-compose.yml -f deploy/compose.cpu.yaml --profile ray up teacher-ray`:
    `adpa serve --ray` starts its own local Ray, answers as the service's logic does in process, and
    exits 0 on SIGTERM. Serve's gRPC proxy listens on every interface (services/ray/launch.py), here on
    a free port, with the token set."""
    import torch

    from adpa.protocol import SupportSpec
    from adpa.training.teacher import LocalTeacher

    token = secrets.token_hex(16)
    # Ray's own files in a short private folder (test-only: a container has its own /tmp).
    ray_tmp = Path(tempfile.mkdtemp(prefix="adpa-ray-"))
    model = compose_model(interpolation_env(token), cpu=True, profiles=("ray",))
    stack = Stack(model, tmp_path, volumes, extra_env={"RAY_TMPDIR": str(ray_tmp), **RAY_ON_SHARED_CORES})
    try:
        stack.start("teacher-ray")
        stack.wait_healthy("teacher-ray", timeout=240)
        endpoint = f"grpc://127.0.0.1:{stack.host_port('teacher-ray', 'ADPA_PORT')}"
        tiny = volumes / "tiny-models" / "tiny"
        _, got, (ids, ranges) = _advantage_request(endpoint, token, tiny / "student")
        assert "teacher" in got.replica
        # the same answer as the service's logic in this process, on the same models (compose's BETA)
        local = LocalTeacher.from_paths(str(tiny / "teacher"), str(tiny / "reference"), beta=0.1)
        want = local.score(ids, ranges, signal="advantage", support=SupportSpec("topk", k=4))
        torch.testing.assert_close(got.values, want.values, atol=2e-5, rtol=0)
        assert torch.equal(got.indices, want.indices)
        # `docker compose stop`: the application is deleted, Ray stopped, exit 0 within stop_grace_period
        assert stack.stop("teacher-ray") == 0, stack.tail("teacher-ray")
    finally:
        stack.kill_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _self_signed(folder: Path) -> bytes:
    """tls.crt and tls.key for `localhost` in `folder` (what TLS_DIR holds); returns the certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "tls.crt").write_bytes(pem)
    (folder / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return pem


@pytest.mark.slow
def test_the_tls_override_serves_trainers_on_other_hosts_over_grpcs(tmp_path, volumes):
    """`docker compose -f docker-compose.yml -f deploy/compose.cpu.yaml -f deploy/compose.tls.yaml up
    teacher reference`: healthy (the check asks plaintext HTTP), grpcs:// answers, grpc:// does not."""
    pytest.importorskip("cryptography")
    import grpc

    from adpa.client import TeacherClient

    token = secrets.token_hex(16)
    cert = _self_signed(tmp_path / "tls")
    env = interpolation_env(token, TLS_DIR=str(tmp_path / "tls"))
    stack = Stack(compose_model(env, cpu=True, tls=True), tmp_path, volumes)
    try:
        stack.start("teacher")
        stack.wait_healthy("teacher")
        port = stack.host_port("teacher", "ADPA_PORT")
        _advantage_request(f"grpcs://localhost:{port}", token, volumes / "tiny-models" / "tiny" / "student",
                           root_certificates=cert)
        with TeacherClient(f"grpc://127.0.0.1:{port}", token=token, timeout=10, max_retries=0) as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                plaintext.info()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stack.stop("teacher") == 0, stack.tail("teacher")
    finally:
        stack.kill_all()
