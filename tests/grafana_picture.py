"""A picture of the Grafana dashboard for the README, drawn from its own queries over real series.

    PYTHONPATH=. .venv/bin/python -m tests.grafana_picture --minutes 6 --out docs/grafana-dashboard.png

Two `defectkit serve` processes on 127.0.0.1 (a stable version, and a canary whose model calls fail 3% of the
time with its scores shifted by 0.2 and whose samples cannot be stored), scraped as the pods of one
InferenceService by a real Prometheus, under steady load (70% stable, 30% canary). Each panel's queries are then
asked of Prometheus over the whole run (query_range, "All" chosen for every variable) and drawn where
the dashboard's grid puts them. Grafana itself is not needed (nor available here): this is the
dashboard's content, not Grafana's look.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import requests
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from defectkit.delivery.traffic import LoadGenerator  # noqa: E402
from defectkit.models import ModelMetadata, build_model, save_model  # noqa: E402
from defectkit.preprocess import PreprocessSpec  # noqa: E402
from defectkit.synthetic import generate_sample  # noqa: E402
from tests.servers import PodTarget, free_port, start_prometheus, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "defectkit-dashboard.json"
INFER = "/v2/models/defectkit/infer"
SCRAPE_S = 5.0
RATE_WINDOW = "30s"  # what Grafana's $__rate_interval is at this scrape interval and a 5-minute range
CANARY_ARGS = ("--fault-error-rate", "0.03", "--fault-score-shift", "0.2", "--breaker-failures", "100000",
               "--sample-uri", "/proc/defectkit-unwritable")


def _models(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    module = build_model("resnet18")
    metadata = ModelMetadata(architecture="resnet18", classes=("good", "crack"),
                             preprocess=PreprocessSpec(image_size=64), threshold=0.55,
                             threshold_policy={"kind": "max_f1"})
    stable = save_model(module, metadata, root / "stable")
    with torch.no_grad():
        module.fc.bias.add_(1e-3)
    return {"stable": stable, "canary": save_model(module, metadata, root / "canary")}


def _series(prometheus: str, expr: str, start: float, end: float) -> list[tuple[dict, list[float], list[float]]]:
    for variable, value in {"$namespace": ".*", "$model_version": ".*", "$__rate_interval": RATE_WINDOW}.items():
        expr = expr.replace(variable, value)
    answer = requests.get(f"{prometheus}/api/v1/query_range", params={
        "query": expr, "start": start, "end": end, "step": SCRAPE_S}, timeout=30).json()
    if answer["status"] != "success":
        raise RuntimeError(f"Prometheus refused {expr}: {answer}")
    return [(r["metric"], [float(t) - start for t, _ in r["values"]], [float(v) for _, v in r["values"]])
            for r in answer["data"]["result"]]


def _legend(template: str, labels: dict) -> str:
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value[:8] if name == "model_version" else value)
    return template


def draw(prometheus: str, start: float, end: float, out: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    figure = plt.figure(figsize=(16, rows * 0.42), facecolor="#111217")
    figure.suptitle(f"{dashboard['title']}  (last {round((end - start) / 60)} minutes)", color="white",
                    fontsize=15, x=0.01, ha="left")
    for panel in panels:
        grid = panel["gridPos"]
        axes = figure.add_axes([0.035 + grid["x"] / 24 * 0.96, 1 - (grid["y"] + grid["h"]) / rows * 0.95 - 0.01,
                                grid["w"] / 24 * 0.96 - 0.05, grid["h"] / rows * 0.95 - 0.05], facecolor="#181b1f")
        axes.set_title(panel["title"], color="white", loc="left", fontsize=11)
        axes.tick_params(colors="#ccccdc", labelsize=8)
        for spine in axes.spines.values():
            spine.set_color("#2c3235")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        scale = 100 if unit == "percentunit" else 1
        if panel["type"] == "stat":
            mappings = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
            texts = []
            for labels, _, values in _series(prometheus, panel["targets"][0]["expr"], start, end):
                state = mappings.get(f"{values[-1]:g}", {"text": f"{values[-1]:g}", "color": "white"})
                texts.append((labels.get("model_version", "")[:8], state["text"], state["color"]))
            for i, (version, text, color) in enumerate(texts):
                axes.text(0.05 + i / max(len(texts), 1), 0.45, f"{version}\n{text}", color=color, fontsize=20,
                          transform=axes.transAxes, va="center")
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        for target in panel["targets"]:
            for labels, times, values in _series(prometheus, target["expr"], start, end):
                axes.plot([t / 60 for t in times], [v * scale for v in values], linewidth=1.6,
                          label=_legend(target.get("legendFormat", ""), labels))
        for step in panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])[1:]:
            axes.axhline(step["value"] * scale, color="red", linestyle="--", linewidth=1)
        axes.set_ylim(bottom=0)
        axes.set_xlabel("minutes", color="#ccccdc", fontsize=8)
        axes.set_ylabel({"percentunit": "%", "s": "seconds", "reqps": "req/s", "ops": "per second"}.get(unit, ""),
                        color="#ccccdc", fontsize=8)
        axes.grid(color="#2c3235")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235", loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80, facecolor=figure.get_facecolor())
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "grafana-dashboard.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        models = _models(root)
        generate_sample(root / "images", count=40, size=64, seed=0)
        images = [p.read_bytes() for p in sorted(root.glob("images/*/*/*.jpg"))]
        servers = {}
        try:
            for name, model in models.items():
                port = free_port()
                extra = CANARY_ARGS if name == "canary" else ("--sample-uri", str(root / "samples"))
                servers[name] = start_server(
                    [sys.executable, "-m", "defectkit", "serve", "--model", str(model), "--port", str(port),
                     "--threads", "1", "--sample-rate", "0.2", *extra],
                    url=f"http://127.0.0.1:{port}", health_path="/v2/health/ready", log_path=root / f"{name}.log",
                    env={"PYTHONPATH": str(ROOT)}, timeout=120)
            targets = [PodTarget(address=s.url.removeprefix("http://"), namespace="factory", pod=f"{name}-0",
                                 labels={"serving.kserve.io/inferenceservice": "defect", "component": "predictor"})
                       for name, s in servers.items()]
            (root / "prometheus").mkdir()
            servers["prometheus"] = prometheus = start_prometheus(root / "prometheus", targets, SCRAPE_S)
            start = time.time()
            with (LoadGenerator(servers["stable"].url + INFER, images, args.rate * 0.7),
                  LoadGenerator(servers["canary"].url + INFER, images, args.rate * 0.3)):
                time.sleep(args.minutes * 60)
            draw(prometheus.url, start, time.time(), args.out)
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
