"""Manifest examples the published schemas must accept, copied verbatim from the docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

# The Rollout of DESIGN.md ("Manifests"), verbatim. DESIGN.md lives outside the checkout,
# so the example is copied here; README.md carries a longer version of it (readme_docs).
DESIGN_ROLLOUT_YAML = """\
apiVersion: edgefleet.io/v1
kind: Rollout
metadata: {name: detector-2-1}
spec:
  model: {name: detector, version: 2.1.0}
  selector: {matchLabels: {tier: retail}, matchExpressions: [{key: accelerator, operator: In, values: [none, coral]}]}
  resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {cpu: "1", memory: 512Mi}}
  strategy:
    steps: [{nodes: 1}, {percent: 10, bake: 10m}, {percent: 50, bake: 30m}, {percent: 100}]
    maxUnavailable: 10%
  gates: {maxP95LatencyMs: 40, maxErrorRate: 0.01, minHealthyRatio: 0.95}
  onFailure: rollback
"""  # noqa: E501


def design_rollout() -> dict[str, Any]:
    doc = yaml.safe_load(DESIGN_ROLLOUT_YAML)
    assert isinstance(doc, dict)
    return doc


def readme_docs() -> list[dict[str, Any]]:
    """The manifest example of README.md's "Rollouts" section (Cluster, ModelVersion,
    Rollout), so the published schemas and the README cannot disagree."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    found = [b for b in blocks if "kind: Rollout" in b]
    assert len(found) == 1, "README.md should hold exactly one manifest example"
    docs = [d for d in yaml.safe_load_all(found[0]) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs
