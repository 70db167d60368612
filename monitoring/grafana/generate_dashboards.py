"""Write the Grafana dashboards of ddn-dist into monitoring/grafana/dashboards/*.json.

Run `python monitoring/grafana/generate_dashboards.py` after editing a panel here; the JSON files
are what Grafana provisions, and a test checks that they equal this script's output. Panels query
the raw `ddn_` metrics (no recording rules), so the dashboards work against any Prometheus that
scrapes the trainers. Every query selects `run` and `job_id` from the dashboard variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 41
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Selector of the run and job chosen in the dashboard variables.
SEL = '{run=~"$run", job_id=~"$job_id"}'
RUN = "run, job_id"
RATE = "$__rate_interval"


@dataclass
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""


@dataclass
class PanelSpec:
    """A panel before layout: kind is `timeseries` or `stat`."""

    title: str
    description: str
    queries: list[Query]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    extra_defaults: dict = field(default_factory=dict)


def _rate(metric: str, by: str | None = RUN) -> str:
    inner = f"rate({metric}{SEL}[{RATE}])"
    return f"sum by ({by}) ({inner})" if by else inner


def _rank_mean_step_seconds() -> str:
    return (
        f"rate(ddn_step_duration_seconds_sum{SEL}[{RATE}])"
        f" / rate(ddn_step_duration_seconds_count{SEL}[{RATE}])"
    )


def _step_quantile(q: float) -> str:
    return (
        f"histogram_quantile({q}, sum by ({RUN}, le) "
        f"(rate(ddn_step_duration_seconds_bucket{SEL}[{RATE}])))"
    )


RANK_LEGEND = "rank {{rank}} ({{node}})"
RUN_LEGEND = "{{run}} {{job_id}}"


def run_overview() -> list[PanelSpec]:
    """Progress, throughput, ETA and the optimisation curves of a run."""
    images_per_second = _rate("ddn_images_processed_total")
    total = f"max by ({RUN}) (ddn_total_kimg{SEL} > 0)"
    progress = f"max by ({RUN}) (ddn_progress_kimg{SEL})"
    return [
        PanelSpec("Progress", "Images trained so far, over the whole run.",
                  [Query(progress, RUN_LEGEND)], unit="suffix: kimg", kind="stat", width=4),
        PanelSpec("Progress of run length", "Share of the configured run length done.",
                  [Query(f"{progress} / {total}", RUN_LEGEND)], unit="percentunit", kind="stat",
                  width=4, extra_defaults={"min": 0, "max": 1}),
        PanelSpec("Images per second", "Training throughput summed over ranks.",
                  [Query(images_per_second, RUN_LEGEND)], unit="short", kind="stat", width=4),
        PanelSpec("ETA", "Time left to the configured run length at the current throughput.",
                  [Query(f"({total} - {progress}) * 1000 / {images_per_second}", RUN_LEGEND)],
                  unit="s", kind="stat", width=4),
        PanelSpec("Time since last step", "Age of the newest completed step over all ranks.",
                  [Query(f"time() - max by ({RUN}) (ddn_last_step_timestamp_seconds{SEL})",
                         RUN_LEGEND)], unit="s", kind="stat", width=4),
        PanelSpec("Ranks reporting", "Ranks whose metrics Prometheus scrapes.",
                  [Query(f"count by ({RUN}) (ddn_run_info{SEL})", RUN_LEGEND)], kind="stat",
                  width=4),
        PanelSpec("Images per second", "Training throughput summed over ranks.",
                  [Query(images_per_second, RUN_LEGEND)]),
        PanelSpec("Progress (kimg)", "Images trained so far, in thousands.",
                  [Query(progress, RUN_LEGEND), Query(total, "run length {{run}} {{job_id}}")],
                  unit="suffix: kimg"),
        PanelSpec("Loss", "Training loss, mean and maximum over ranks.",
                  [Query(f"avg by ({RUN}) (ddn_loss{SEL})", "mean {{run}} {{job_id}}"),
                   Query(f"max by ({RUN}) (ddn_loss{SEL})", "max {{run}} {{job_id}}")]),
        PanelSpec("Loss per layer group", "Training loss of each layer group, mean over ranks.",
                  [Query(f"avg by ({RUN}, group) (ddn_layer_group_loss{SEL})",
                         "{{group}} {{run}} {{job_id}}")]),
        PanelSpec("Gradient norm", "Global gradient L2 norm, maximum over ranks.",
                  [Query(f"max by ({RUN}) (ddn_grad_norm{SEL})", RUN_LEGEND)]),
        PanelSpec("Learning rate", "Learning rate of the last step.",
                  [Query(f"max by ({RUN}) (ddn_learning_rate{SEL})", RUN_LEGEND)]),
        PanelSpec("Step duration", "Median and 90th percentile of the step time over ranks.",
                  [Query(_step_quantile(0.5), "p50 {{run}} {{job_id}}"),
                   Query(_step_quantile(0.9), "p90 {{run}} {{job_id}}")], unit="s"),
        PanelSpec("Seconds per kimg", "Wall time per thousand training images.",
                  [Query(f"1000 / {images_per_second}", RUN_LEGEND)], unit="s"),
    ]


def data_pipeline() -> list[PanelSpec]:
    """Data wait, storage throughput and the loader's fault counters."""
    wait_share = (
        f"{_rate('ddn_data_wait_seconds_total')} / {_rate('ddn_step_duration_seconds_sum')}"
    )
    wait_per_step = (
        f"{_rate('ddn_data_wait_seconds_total', None)}"
        f" / {_rate('ddn_step_duration_seconds_count', None)}"
    )
    return [
        PanelSpec("Data wait share of step time",
                  "Time the main processes waited for batches over the total step time.",
                  [Query(wait_share, RUN_LEGEND)], unit="percentunit",
                  extra_defaults={"min": 0, "max": 1}),
        PanelSpec("Data wait share of the last step by rank",
                  "Share of each rank's last step spent waiting for data.",
                  [Query(f"ddn_data_wait_ratio{SEL}", RANK_LEGEND)], unit="percentunit",
                  extra_defaults={"min": 0, "max": 1}),
        PanelSpec("Data wait per step by rank", "Mean wait for the next batch, per rank.",
                  [Query(wait_per_step, RANK_LEGEND)], unit="s"),
        PanelSpec("Storage read throughput", "Bytes read from shard storage, summed over ranks.",
                  [Query(_rate("ddn_storage_read_bytes_total"), RUN_LEGEND)], unit="Bps"),
        PanelSpec("Storage read throughput by rank", "Bytes read from shard storage per rank.",
                  [Query(_rate("ddn_storage_read_bytes_total", None), RANK_LEGEND)], unit="Bps"),
        PanelSpec("Storage retries and errors per minute",
                  "Reads retried after a transient error, and reads that failed every retry.",
                  [Query(f"60 * {_rate('ddn_storage_retries_total')}",
                         "retries {{run}} {{job_id}}"),
                   Query(f"60 * {_rate('ddn_storage_errors_total')}",
                         "errors {{run}} {{job_id}}")]),
        PanelSpec("Samples consumed per second", "Samples the loaders marked consumed.",
                  [Query(_rate("ddn_samples_consumed_total"), RUN_LEGEND)]),
        PanelSpec("Corrupt, padded and dropped samples",
                  "Counts since each rank started, summed over ranks.",
                  [Query(f"sum by ({RUN}) (ddn_corrupt_samples_skipped_total{SEL})",
                         "corrupt skipped {{run}} {{job_id}}"),
                   Query(f"sum by ({RUN}) (ddn_padded_samples_total{SEL})",
                         "padded {{run}} {{job_id}}"),
                   Query(f"sum by ({RUN}) (ddn_dropped_samples_total{SEL})",
                         "dropped {{run}} {{job_id}}")]),
    ]


def stragglers() -> list[PanelSpec]:
    """Per-rank step time, data wait, throughput and memory, to find a slow rank."""
    mean_step = _rank_mean_step_seconds()
    return [
        PanelSpec("Mean step time by rank", "Mean wall time of a step on each rank.",
                  [Query(mean_step, RANK_LEGEND)], unit="s", width=24),
        PanelSpec("Step time spread over ranks",
                  "Slowest minus fastest rank mean step time.",
                  [Query(f"max by ({RUN}) ({mean_step}) - min by ({RUN}) ({mean_step})",
                         RUN_LEGEND)], unit="s"),
        PanelSpec("Slowest rank over median",
                  "Mean step time of the slowest rank divided by the median over ranks.",
                  [Query(f"max by ({RUN}) ({mean_step}) / quantile by ({RUN}) (0.5, {mean_step})",
                         RUN_LEGEND)]),
        PanelSpec("Data wait per step by rank", "Mean wait for the next batch, per rank.",
                  [Query(f"{_rate('ddn_data_wait_seconds_total', None)}"
                         f" / {_rate('ddn_step_duration_seconds_count', None)}", RANK_LEGEND)],
                  unit="s"),
        PanelSpec("Images per second by rank", "Throughput of each rank.",
                  [Query(_rate("ddn_images_processed_total", None), RANK_LEGEND)]),
        PanelSpec("Time since last step by rank", "Age of each rank's last completed step.",
                  [Query(f"time() - ddn_last_step_timestamp_seconds{SEL}", RANK_LEGEND)],
                  unit="s"),
        PanelSpec("Resident memory by rank", "Process resident set size, current and peak.",
                  [Query(f"ddn_process_resident_memory_bytes{SEL}", RANK_LEGEND),
                   Query(f"ddn_process_resident_memory_max_bytes{SEL}", "peak " + RANK_LEGEND)],
                  unit="bytes"),
    ]


def checkpoints_and_faults() -> list[PanelSpec]:
    """Checkpoint timing, restarts, non-finite steps, storage errors and S&P health."""
    return [
        PanelSpec("Time since last checkpoint", "Age of the newest successful checkpoint save.",
                  [Query(f"time() - max by ({RUN}) "
                         f"(ddn_checkpoint_last_success_timestamp_seconds{SEL} > 0)", RUN_LEGEND)],
                  unit="s", kind="stat", width=6),
        PanelSpec("Checkpoints saved", "Successful saves since the ranks started.",
                  [Query(f"max by ({RUN}) (ddn_checkpoint_save_duration_seconds_count{SEL})",
                         RUN_LEGEND)], kind="stat", width=6),
        PanelSpec("Restarts", "Process restarts seen in the time range, and whether the "
                  "running processes resumed from a checkpoint.",
                  [Query(f"max by ({RUN}) (changes(ddn_start_time_seconds{SEL}[$__range]))",
                         "restarts in range {{run}} {{job_id}}"),
                   Query(f"max by ({RUN}) (ddn_restarts_total{SEL})",
                         "resumed {{run}} {{job_id}}")], kind="stat", width=6),
        PanelSpec("Non-finite steps skipped", "Steps skipped for a non-finite loss or gradient.",
                  [Query(f"sum by ({RUN}) (ddn_nonfinite_steps_skipped_total{SEL})", RUN_LEGEND)],
                  kind="stat", width=6),
        PanelSpec("Checkpoint save duration",
                  "Mean save time since the ranks started, slowest rank.",
                  [Query(f"max by ({RUN}) (ddn_checkpoint_save_duration_seconds_sum{SEL}"
                         f" / ddn_checkpoint_save_duration_seconds_count{SEL})", RUN_LEGEND)],
                  unit="s"),
        PanelSpec("Storage errors",
                  "Storage reads that failed after every retry, summed over ranks.",
                  [Query(f"sum by ({RUN}) (ddn_storage_errors_total{SEL})", RUN_LEGEND)]),
        PanelSpec("Split-and-prune events per minute", "S&P events applied, by layer group.",
                  [Query(f"60 * {_rate('ddn_split_prune_events_total', RUN + ', group')}",
                         "{{group}} {{run}} {{job_id}}")]),
        PanelSpec("Node frequency spread",
                  "Standard deviation of p_k*K over the nodes of a layer group (0 is uniform).",
                  [Query(f"max by ({RUN}, group) (ddn_node_frequency_spread{SEL})",
                         "{{group}} {{run}} {{job_id}}")]),
        PanelSpec("GPU memory by rank", "Allocated, peak allocated and reserved GPU memory.",
                  [Query(f"ddn_gpu_memory_allocated_bytes{SEL}", "allocated " + RANK_LEGEND),
                   Query(f"ddn_gpu_memory_max_allocated_bytes{SEL}", "peak " + RANK_LEGEND),
                   Query(f"ddn_gpu_memory_reserved_bytes{SEL}", "reserved " + RANK_LEGEND)],
                  unit="bytes"),
        PanelSpec("Resident memory by rank", "Process resident set size.",
                  [Query(f"ddn_process_resident_memory_bytes{SEL}", RANK_LEGEND)], unit="bytes"),
    ]


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "sort": 1,
    }


def _panel(spec: PanelSpec, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr,
         "legendFormat": q.legend}
        for i, q in enumerate(spec.queries)
    ]
    options: dict = {"tooltip": {"mode": "multi", "sort": "desc"}}
    if spec.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "none", "graphMode": "area", "textMode": "value_and_name"}
    return {
        "id": panel_id,
        "type": spec.kind,
        "title": spec.title,
        "description": spec.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": spec.height, "w": spec.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec.unit, **spec.extra_defaults}, "overrides": []},
        "options": options,
        "targets": targets,
    }


def build_dashboard(uid: str, title: str, description: str, specs: list[PanelSpec]) -> dict:
    """Lay the panels out left to right in a 24-column grid and wrap them in a dashboard."""
    panels = []
    x = y = row_height = 0
    for panel_id, spec in enumerate(specs, start=1):
        if x + spec.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel(spec, panel_id, x, y))
        x += spec.width
        row_height = max(row_height, spec.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ddn-dist"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus"},
            _variable("run", "Run", "label_values(ddn_run_info, run)"),
            _variable("job_id", "Job", 'label_values(ddn_run_info{run=~"$run"}, job_id)'),
        ]},
        "annotations": {"list": []},
        "links": [{"title": "ddn-dist dashboards", "type": "dashboards", "tags": ["ddn-dist"],
                   "asDropdown": True, "icon": "external link", "includeVars": True,
                   "keepTime": True, "targetBlank": False, "tooltip": ""}],
        "panels": panels,
    }


DASHBOARDS = {
    "ddn-run-overview.json": ("ddn-run-overview", "DDN run overview",
                              "Progress, throughput, ETA and loss of ddn-dist training runs.",
                              run_overview),
    "ddn-data-pipeline.json": ("ddn-data-pipeline", "DDN data pipeline",
                               "Data wait, storage throughput and loader faults.", data_pipeline),
    "ddn-stragglers.json": ("ddn-stragglers", "DDN per-rank stragglers",
                            "Per-rank step time, data wait, throughput and memory.", stragglers),
    "ddn-checkpoints-faults.json": ("ddn-checkpoints-faults", "DDN checkpoints and faults",
                                    "Checkpoint timing, restarts, non-finite steps, storage "
                                    "errors and split-and-prune health.",
                                    checkpoints_and_faults),
}


def render_all() -> dict[str, str]:
    """Return file name -> JSON text of every dashboard."""
    rendered = {}
    for name, (uid, title, description, make_specs) in DASHBOARDS.items():
        dashboard = build_dashboard(uid, title, description, make_specs())
        rendered[name] = json.dumps(dashboard, indent=2) + "\n"
    return rendered


def main() -> None:
    DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (DASHBOARD_DIR / name).write_text(text)
        print(f"wrote {DASHBOARD_DIR / name}")


if __name__ == "__main__":
    main()
