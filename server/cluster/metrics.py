"""One aggregated /metrics for the cluster: each replica pushes its own Prometheus text to a named Ray actor
every few seconds; the ingress merges them, every sample labelled with its ``replica``. A replica that
stopped pushing (dead, or scaled down) drops out after ``STALE_S``."""

from __future__ import annotations

import re
import time

STALE_S = 30.0
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)")


class MetricsBoard:
    """A Ray actor (named, one per application): replica id -> (pushed at, Prometheus text)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.time(), text)

    def all(self) -> dict[str, str]:
        now = time.time()
        self.texts = {r: (t, s) for r, (t, s) in self.texts.items() if now - t < STALE_S}
        return {r: s for r, (_, s) in self.texts.items()}


def merge(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one exposition: each family's HELP/TYPE once, then every
    replica's samples of it with a ``replica`` label added."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # family -> (HELP/TYPE lines, samples)
    for replica, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                meta = families.setdefault(family, ([], []))[0]
                if line not in meta:
                    meta.append(line)
            elif line and not line.startswith("#"):
                m = _SAMPLE.fullmatch(line)
                if m is None:
                    continue
                name, labels, rest = m.groups()
                label = f'replica="{replica}"'
                labels = "{" + label + ("," + labels[1:] if labels and labels != "{}" else "}")
                families.setdefault(family, ([], []))[1].append(f"{name}{labels}{rest}")
    out = []
    for meta, samples in families.values():
        out += meta + samples
    return "\n".join(out) + "\n"
