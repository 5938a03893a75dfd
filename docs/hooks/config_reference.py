"""MkDocs hook: the configuration reference, rendered from the pydantic models at build time so that it
cannot drift from the code.

A page marks where a reference goes with `<!-- config-reference: NAME -->` (NAME one of `TABLES`). Each
model becomes a heading with a fixed id and a table: field, type, default, bounds, description, and the
environment variable that sets it when the model reads the environment. Descriptions, defaults and bounds
come from the models themselves (`Field(description=..., ge=..., ...)`); bounds are read from the JSON
schema, which also holds the bounds of list items. tests/test_docs.py checks that every field has its row.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from t2i_reward.finetune.settings import FinetuneSettings
from t2i_reward.finetune.spec import JobLimits, JobSpec
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.mllm import MLLMConfig
from t2i_reward.rewarders.pools import IngressConfig, PoolConfig, RayConfig
from t2i_reward.rewarders.registry import get_expert_class, list_experts
from t2i_reward.service.settings import Settings

MARKER = re.compile(r"<!-- config-reference: ([\w-]+) -->")

# JSON-schema keyword -> how its bound reads in the table
BOUNDS = {"minimum": "≥ {}", "exclusiveMinimum": "> {}", "maximum": "≤ {}", "exclusiveMaximum": "< {}",
          "multipleOf": "multiple of {}", "minLength": "≥ {} chars", "maxLength": "≤ {} chars",
          "minItems": "≥ {} items", "maxItems": "≤ {} items", "maxProperties": "≤ {} entries", "pattern": "matches `{}`"}


def type_name(t) -> str:
    """A field's annotation as a reader would write it: `int`, `Path | None`, `list[str]`, `'a' | 'b'`."""
    origin, args = get_origin(t), get_args(t)
    if t is type(None):
        return "None"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def bounds(schema: dict) -> list[str]:
    """The bounds in a property's JSON schema, including those of its items, keys, values and tuple members."""
    out = [fmt.format(schema[k]) for k, fmt in BOUNDS.items() if k in schema]
    if "minItems" in schema and schema.get("minItems") == schema.get("maxItems"):  # a fixed-length tuple
        out = [b for b in out if not b.endswith(" items")] + [f"{schema['minItems']} items"]
    for alt in schema.get("anyOf", []):
        out += bounds(alt)
    inner = [("each item", schema.get("items")), ("each value", schema.get("additionalProperties")),
             ("each key", schema.get("propertyNames"))]
    inner += [(f"each key matches `{k}`, its value", v) for k, v in schema.get("patternProperties", {}).items()]
    inner += [("each member", m) for m in {repr(m): m for m in schema.get("prefixItems", [])}.values()]
    for what, sub in inner:
        parts = bounds(sub) if isinstance(sub, dict) else []
        if parts or what.startswith("each key matches"):
            out.append(f"{what} {', '.join(parts)}".strip())
    return out


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "its fields' defaults"
        if isinstance(value, dict) and value:
            return "the profile's"  # RewardConfig.experts: the default profile's experts
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, Path):  # the cache under the reader's home, not the build machine's
        home = str(Path.home())
        return f"`{str(value).replace(home, '~', 1)}`"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def cell(text: str) -> str:
    """A table cell: pipes escaped outside code spans (inside them the table parser leaves pipes alone)."""
    parts = text.replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def table(model: type[BaseModel], env_prefix: str | None = None, worker_fields: set[str] | None = None) -> str:
    """One row per field. `env_prefix`: the variables' prefix when the model reads the environment."""
    properties = model.model_json_schema()["properties"]
    head = ["field", "type", "default", "bounds", "description"]
    head += ["environment variable"] if env_prefix else []
    head += ["read by"] if worker_fields is not None else []
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, field in model.model_fields.items():
        row = [f"`{name}`", f"`{type_name(field.annotation)}`", default_text(field),
               ", ".join(bounds(properties.get(name, {}))), field.description or ""]
        if env_prefix:
            row.append(f"`{env_prefix}{name.upper()}`")
        if worker_fields is not None:
            row.append("service, worker" if name in worker_fields else "service")
        rows.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(rows)


def section(title: str, anchor: str, body: str, level: int = 3) -> str:
    return f"{'#' * level} {title} {{#{anchor}}}\n\n{body}\n"


def settings_reference() -> str:
    prefix = Settings.model_config["env_prefix"]
    nested = Settings.model_config["env_nested_delimiter"]
    return "\n".join([
        section("Service and worker settings (`Settings`)", "service-settings",
                table(Settings, prefix, set(FinetuneSettings.model_fields))),
        section("Job limits (`JobLimits`)", "job-limits", table(JobLimits, f"{prefix}JOB_LIMITS{nested}")),
        section("The MLLM peer (`MLLMConfig`)", "mllm-settings",
                table(MLLMConfig, f"{prefix}MLLM{nested}")),
    ])


def reward_reference() -> str:
    return section("The rewarder (`RewardConfig`)", "reward-config", table(RewardConfig, RewardConfig.model_config["env_prefix"]))


def experts_reference() -> str:
    prefix, nested = RewardConfig.model_config["env_prefix"], RewardConfig.model_config["env_nested_delimiter"]
    return "\n".join(
        section(f"`{name}` (`{get_expert_class(name).Config.__name__}`)", f"expert-{name}",
                table(get_expert_class(name).Config, f"{prefix}EXPERTS{nested}{name.upper()}{nested}"), level=4)
        for name in list_experts())


def ray_reference() -> str:
    return "\n".join([
        section("Ray Serve (`RayConfig`, the config's `ray:`)", "ray-config", table(RayConfig)),
        section("A pool (`PoolConfig`)", "ray-pool", table(PoolConfig), level=4),
        section("The ingress (`IngressConfig`)", "ray-ingress", table(IngressConfig), level=4),
    ])


def job_reference() -> str:
    return section("The job spec (`JobSpec`)", "job-spec", table(JobSpec))


TABLES = {"settings": settings_reference, "reward": reward_reference, "experts": experts_reference, "ray": ray_reference,
          "job-spec": job_reference}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_path}: unknown config reference {name!r}; known: {', '.join(TABLES)}")
        return TABLES[name]()

    return MARKER.sub(render, markdown)
