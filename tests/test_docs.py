"""The documentation site builds in strict mode, its configuration reference covers every field of the
models it is generated from, and the README stays short with working links."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from t2i_reward.finetune.spec import JobLimits, JobSpec
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.mllm import MLLMConfig
from t2i_reward.rewarders.pools import IngressConfig, PoolConfig, RayConfig
from importlib.metadata import entry_points

from t2i_reward.rewarders.registry import BUILTIN, ENTRY_POINT_GROUP, get_expert_class, list_experts
from t2i_reward.service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return out


def test_the_site_builds_in_strict_mode(site):
    for page in ("quickstart", "service", "experts", "configuration", "finetuning", "clients", "scale-out",
                 "reliability", "ray", "benchmarks", "architecture", "scores", "parity"):
        assert (site / page / "index.html").is_file(), page
    assert (site / "index.html").is_file()


def reference_sections() -> dict[str, type]:
    """Heading id on the configuration page -> the model whose fields its table must list."""
    sections = {"service-settings": Settings, "job-limits": JobLimits, "mllm-settings": MLLMConfig,
                "reward-config": RewardConfig, "job-spec": JobSpec, "ray-config": RayConfig, "ray-pool": PoolConfig,
                "ray-ingress": IngressConfig}
    # the experts the docs build sees: the built-in ones and installed plugins, not classes that a test
    # registered at run time in this process
    sections.update({f"expert-{name}": get_expert_class(name).Config for name in list_experts()
                     if name in BUILTIN or name in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}})
    return sections


def section_html(html: str, anchor: str) -> str:
    """The HTML from the heading with id `anchor` to the next heading."""
    start = html.index(f'id="{anchor}"')
    following = re.search(r"<h[1-4][ >]", html[start:])
    return html[start: start + following.start()] if following else html[start:]


@pytest.mark.parametrize("anchor, model", reference_sections().items(), ids=list(reference_sections()))
def test_the_configuration_reference_has_a_row_per_field(site, anchor, model):
    html = (site / "configuration" / "index.html").read_text()
    assert f'id="{anchor}"' in html, f"no section {anchor} on the configuration page"
    table = section_html(html, anchor)
    rows = re.findall(r"<tr>\s*<td><code>([^<]+)</code></td>", table)
    assert rows == list(model.model_fields), f"{anchor}: rows {rows} != fields {list(model.model_fields)}"


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links, "the README links into the docs"
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
