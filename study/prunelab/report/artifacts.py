"""The versioned artifacts folder: ``<root>/<study>/<version>/`` per run and ``<root>/index.html``.

A run folder holds the per-item and summary tables (parquet and CSV), every chart as a self-contained
HTML page plus PNG and SVG (rendered by vl-convert, no browser needed), ``manifest.json`` and
``report.html``. The version names the run: UTC time, short git commit and study-config hash, e.g.
``20261128T143000Z-abc1234-9f8e7d6c``. A run folder is assembled under a hidden staging name and
renamed into place when complete, so a crash never leaves half a run that looks finished, and an
existing run folder is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import vl_convert as vlc

from prunelab import versions
from prunelab.errors import FileProblem, PrunelabError
from prunelab.readers import LINK_REFUSED, atomic_write, refuse_links, staging_folder
from prunelab.records import json_digest
from prunelab.report import fidelity, pages
from prunelab.report.charts import baseline_history_chart, build_charts
from prunelab.report.equalsize import equal_size_table, equal_speed_table
from prunelab.report.findings import findings, headline
from prunelab.report.healstats import healing_table
from prunelab.report.sizes import VariantSize, run_sizes
from prunelab.report.stats import harm_order, statistics_manifest, summarize
from prunelab.versions import code_version, git_commit

CONTAINER_IMAGE_ENV = "PRUNELAB_CONTAINER_IMAGE"
# Manifest field <- environment variable, for runs inside the prunelab image: the image's tag, the
# base image's reference and its ID (the digest of what the image was built on).
CONTAINER_FIELDS = {"image_tag": "PRUNELAB_IMAGE_TAG", "base_image": "PRUNELAB_BASE_IMAGE",
                    "base_image_id": "PRUNELAB_BASE_IMAGE_ID"}
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PNG_SCALE = 1


def container_provenance() -> dict[str, str]:
    """Image tag, base image reference and base image ID when running in the prunelab image."""
    return {field: os.environ[env] for field, env in CONTAINER_FIELDS.items()
            if os.environ.get(env, "unknown") not in {"", "unknown"}}


def version_id(config_digest: str, commit: str | None, now: datetime) -> str:
    """``<UTC time>-<7-char commit or 'nogit'>[+dirty]-<8-char config hash>``; sorts by time.

    ``+dirty`` stays: a run made with uncommitted edits says so in its name.
    """
    head, _, dirty = (commit or "nogit").partition("+")
    short = head[:7] + ("+dirty" if dirty else "")
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{short}-{config_digest[:8]}"


def machine() -> dict[str, Any]:
    """The CPU model, core count and torch's thread count: what CPU timings and float sums depend on."""
    import platform

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def write_run(
    root: str | os.PathLike,
    study: str,
    items: pl.DataFrame,
    manifest: Mapping[str, Any],
    *,
    summary: pl.DataFrame | None = None,
    bench: pl.DataFrame | None = None,
    now: datetime | None = None,
    commit: str | None = None,
) -> Path:
    """Write one run's folder from its per-item table, then regenerate the index; returns the folder.

    ``manifest`` comes from the runner: ``config_hash`` (the run's identity, ``prunelab.runner.identity``;
    a caller without one passes ``config``, named by its ``json_digest``), and whatever it knows
    — ``study_file`` (the file's text), ``model``, ``model_hash``, ``device``, ``timings``,
    ``packages``, ``container_image``. Identity fields (study, version, created, git commit) and the
    headline numbers are added here; the container image falls back to ``$PRUNELAB_CONTAINER_IMAGE``.
    ``bench`` (``benchmodel.bench_rows``): each variant's measured size and speed, written as a table,
    charted against its accuracy and the basis of the equal-speed comparison (``equal_speed``).
    """
    if not STUDY_NAME.match(study):
        raise PrunelabError(f"study name {study!r} is not a plain folder name (letters, digits, . _ -)")
    digest = manifest.get("config_hash") or (json_digest(manifest["config"]) if "config" in manifest else None)
    if not digest:
        raise PrunelabError("the run manifest needs a config_hash (or the config to hash)")
    now = now or datetime.now(UTC)
    commit = commit or git_commit()
    version = version_id(digest, commit, now)
    final = refuse_links(Path(root), Path(root) / study / version)
    if final.exists():
        raise PrunelabError(f"artifacts folder {final} already exists; refusing to overwrite a finished run")
    identity = {
        **manifest, "study": study, "version": version, "created": f"{now.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}",
        "config_hash": digest, "git_commit": commit,
        "container_image": manifest.get("container_image") or os.environ.get(CONTAINER_IMAGE_ENV),
        **container_provenance(),
        "packages": manifest.get("packages") or package_versions(),
        "machine": manifest.get("machine") or machine(),
    }
    with staging_folder(final) as staging:  # a failed or killed write leaves no .partial folder for long
        render_run(staging, items, identity, summary=summary, bench=bench, write_items=True)
        os.replace(staging, final)
    build_index(root)
    return final


def render_run(folder: Path, items: pl.DataFrame, manifest: Mapping[str, Any], *,
               summary: pl.DataFrame | None = None, bench: pl.DataFrame | None = None,
               write_items: bool = False) -> dict[str, Any]:
    """Everything derived from a run's items: summary, charts, manifest (headline, tests), report.

    ``manifest`` holds the run's identity; its ``metrics`` and ``answers`` (the evaluators'
    declarations) tell the statistics each metric's kind and direction and the multiple-choice
    tables which record fields hold what; ``model_layers`` is what model-dependent layer declarations
    are handed. Returns the manifest written.
    """
    metric_specs = {(m["task"], m["name"]): m for m in manifest.get("metrics") or []}
    summary = summary if summary is not None else summarize(items, metrics=metric_specs)
    files = write_tables(folder, items if write_items else None, summary, bench)
    healing = healing_table(items, summary)  # healed variants (``[recovery]``) vs their unhealed selves
    if healing.height:
        files += write_tables(folder, None, None, extra={"healing": healing})
    sizes = run_sizes(manifest, list(summary.select("variant", "strategy", "params").unique(maintain_order=True).iter_rows()))
    equal_size = equal_size_table(items, summary, sizes, bench)
    if equal_size.height:
        files += write_tables(folder, None, None, extra={"equal_size": equal_size})
    equal_speed = equal_speed_table(items, summary, sizes, bench)
    if equal_speed.height:
        files += write_tables(folder, None, None, extra={"equal_speed": equal_speed})
    extras = fidelity.summary_records(items, metric_specs, manifest.get("answers") or {})
    charts = build_charts(summary, bench=bench, chance=extras.get("chance"), sizes=sizes)
    charts.update(extra_charts(extras, sizes))
    specs = {name: chart.to_dict() for name, chart in charts.items()}
    files += write_charts(folder / "charts", specs)
    full_manifest = {
        **manifest, "strategies": sorted(set(summary["strategy"])), "tasks": list(dict.fromkeys(summary["task"])),
        "statistics": statistics_manifest(summary), "headline": headline(summary),
        "files": {f: _sha256(folder / f) for f in files},
        **({"sensitive_metrics": extras} if extras else {}),
    }
    _write_text(folder / "manifest.json", json.dumps(full_manifest, indent=2, default=str) + "\n")
    report = pages.report_page(full_manifest, harm_order(summary).to_dicts(), specs, [*files, "manifest.json"],
                               bench.to_dicts() if bench is not None else None, findings=findings(summary, sizes),
                               extra_sections=pages.sensitive_sections(extras),
                               equal_size=equal_size.to_dicts(), equal_speed=equal_speed.to_dicts(),
                               healing_rows=healing.to_dicts() if healing.height else None)
    _write_text(folder / "report.html", report)
    return full_manifest


def rebuild_run(run_dir: str | os.PathLike, tell: Callable[[str], None] | None = None) -> Path:
    """Rebuild a finished run's summary, charts, manifest and report from its stored items, then the index.

    No model is loaded: everything derives from ``items.parquet`` (and ``bench.parquet``) with the
    current statistics. The items and the run's identity stay; the manifest notes the rebuild.
    A shared run folder is untrusted: only chart files prunelab names (``charts/<name>.<ext>``, inside
    the folder, not links) are removed, whatever the manifest lists; ``tell`` hears of the others.
    """
    folder = Path(run_dir)
    items_path, manifest_path = folder / "items.parquet", folder / "manifest.json"
    for path in (items_path, manifest_path):
        if not path.is_file():
            raise PrunelabError(f"{folder} is not a run folder: {path.name} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        items = pl.read_parquet(items_path)
        bench = pl.read_parquet(folder / "bench.parquet") if (folder / "bench.parquet").is_file() else None
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise PrunelabError(f"{folder}: cannot read the stored run ({' '.join(str(exc).split())[:200]})") from None
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    stale = [f for f in listed if isinstance(f, str) and f.startswith("charts/")]
    refused = [name for name in stale if not remove_own_chart(folder, name)]
    if refused and tell:
        tell(f"kept {len(refused)} file(s) the manifest lists that are not chart files inside {folder}: "
             f"{', '.join(map(repr, refused[:3]))}{' ...' if len(refused) > 3 else ''}")
    manifest["report_rebuilt"] = {"created": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}", **code_version()}
    manifest["metrics"] = declared_tolerances(manifest.get("metrics") or [])
    manifest["answers"] = declared_answers(manifest)
    files = dict(listed)
    written = render_run(folder, items, manifest, bench=bench)
    kept = {f: files[f] for f in ("items.parquet", "items.csv") if f in files}
    manifest_out = {**written, "files": {**kept, **written["files"]}}
    _write_text(manifest_path, json.dumps(manifest_out, indent=2, default=str) + "\n")
    root = folder.parent.parent
    if has_prunelab_index(root):
        build_index(root, tell)
    elif tell:  # a run folder outside an artifacts root (a download): nothing is written beside it
        tell(f"index not rebuilt: {root} has no prunelab index (prunelab index --root {root} makes one)")
    return folder


def has_prunelab_index(root: Path) -> bool:
    """Whether ``root`` is an artifacts root: it holds an index prunelab wrote."""
    index = index_file(root)
    return index.is_file() and not index.is_symlink() and pages.written_by_prunelab(index)


OWN_CHART = re.compile(r"^charts/[A-Za-z0-9_-]+\.(html|svg|png)$")


def remove_own_chart(folder: Path, name: str) -> bool:
    """Remove ``folder/name`` if it is a chart file prunelab writes there; False (kept) for any other name.

    The name must be ``charts/<plain name>.<html|svg|png>`` and resolve inside ``folder/charts``
    (no ``..``, no link on the way): a manifest listing ``../victim.txt`` deletes nothing.
    """
    if not OWN_CHART.match(name):
        return False
    path = folder / name
    try:
        refuse_links(folder, path)
    except PrunelabError:
        return False
    if path.resolve().parent != (folder / "charts").resolve():
        return False
    path.unlink(missing_ok=True)
    return True


#: Metric declarations added after some runs were made: a rebuilt report of such a run asks the installed evaluator.
LATER_METRIC_FIELDS = ("tolerance", "prediction", "fidelity", "per_token")


def declared_tolerances(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored run's metric declarations, with the installed evaluator's tolerance (and an accuracy
    metric's prediction field, a fidelity metric's role and per-token field) where the run predates
    them (no such key): the rebuilt report then tests fidelity against the tolerance, builds its
    fidelity table and counts each metric's answers. A run that recorded one
    (None included) keeps it; an evaluator not installed changes nothing."""
    from prunelab.registry import default_registry

    registry = default_registry()
    out = []
    for metric in metrics:
        missing = [key for key in LATER_METRIC_FIELDS if key not in metric]
        if missing and metric.get("task") in registry.evaluators:
            declared = {m.name: m for m in registry.evaluator(metric["task"]).metrics}
            spec = declared.get(metric.get("name"))
            metric = {**metric, **{key: getattr(spec, key) if spec else None for key in missing}}
        out.append(metric)
    return out


def declared_answers(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run's answer fields (``Evaluator.answers``), or, for a run that predates them (no
    ``answers`` key), the installed evaluators' declarations for the run's tasks."""
    if "answers" in manifest:
        return dict(manifest["answers"] or {})
    from dataclasses import asdict

    from prunelab.registry import default_registry

    registry = default_registry()
    tasks = {m.get("task") for m in manifest.get("metrics") or []}
    return {task: asdict(registry.evaluator(task).answers) for task in sorted(t for t in tasks if t)
            if task in registry.evaluators and registry.evaluator(task).answers is not None}


def extra_charts(extras: Mapping[str, list[dict[str, Any]]], sizes: Mapping[str, VariantSize]) -> dict[str, Any]:
    """Charts of the metrics that see harm at chance (``fidelity.summary_records``)."""
    from prunelab.report.charts import answer_letters_chart, fidelity_chart, fidelity_layer_chart

    charts = {"fidelity": fidelity_chart(extras.get("fidelity", [])),
              "fidelity_layer_sweep": fidelity_layer_chart(extras.get("fidelity", []), dict(sizes)),
              "answer_letters": answer_letters_chart(extras.get("answer_letters", []))}
    return {name: chart for name, chart in charts.items() if chart is not None}


def write_tables(folder: Path, items: pl.DataFrame | None, summary: pl.DataFrame | None,
                 bench: pl.DataFrame | None = None, extra: Mapping[str, pl.DataFrame] | None = None) -> list[str]:
    """items, summary (and bench, and ``extra``) as parquet (exact types) and CSV (for spreadsheets);
    relative paths. Each file is written atomically: a link planted in the folder is replaced, never followed.

    ``items`` None: a rebuild, the stored items stay as they are.
    """
    written = []
    tables = {"items": items, "summary": summary, "bench": bench, **(extra or {})}
    for name, frame in tables.items():
        if frame is None:
            continue
        atomic_write(folder / f"{name}.parquet", frame.write_parquet)
        atomic_write(folder / f"{name}.csv", frame.write_csv)
        written += [f"{name}.parquet", f"{name}.csv"]
    return written


def write_charts(folder: Path, specs: Mapping[str, dict[str, Any]]) -> list[str]:
    """Each chart as a self-contained HTML page, an SVG and a PNG; returns paths relative to the run."""
    if folder.is_symlink():
        raise FileProblem(folder, LINK_REFUSED)
    folder.mkdir(parents=True, exist_ok=True)
    version = pages.vega_lite_version()
    written = []
    for name, spec in specs.items():
        _write_text(folder / f"{name}.html", pages.chart_page(name.replace("_", " "), spec))
        _write_text(folder / f"{name}.svg", vlc.vegalite_to_svg(spec, vl_version=version))
        png = vlc.vegalite_to_png(spec, vl_version=version, scale=PNG_SCALE)
        atomic_write(folder / f"{name}.png", lambda staging, png=png: staging.write_bytes(png))
        written += [f"charts/{name}.{ext}" for ext in ("html", "svg", "png")]
    return written


def package_versions() -> dict[str, str]:
    """The evaluation's package versions plus the ones that drew the artifacts."""
    return versions.package_versions((*versions.EVALUATION_PACKAGES, *versions.REPORT_PACKAGES))


INDEX = "index.html"
#: where prunelab's index goes when ``index.html`` is someone else's page (kept, never overwritten)
OWN_INDEX = "prunelab-index.html"


def index_file(root: str | os.PathLike) -> Path:
    """The file prunelab's index is written to: ``index.html``, unless one exists that prunelab did not
    write (no ``generator`` meta tag) -- that one is kept and the index goes to ``prunelab-index.html``."""
    index = Path(root) / INDEX
    if index.is_symlink() or (index.exists() and not pages.written_by_prunelab(index)):
        return Path(root) / OWN_INDEX
    return index


def build_index(root: str | os.PathLike, tell: Callable[[str], None] | None = None) -> Path:
    """(Re)write prunelab's index (``index_file``) listing every ``<study>/<version>`` folder that has a manifest.

    Folders and manifests reached through a symbolic link are not listed (the index describes this
    folder); every link is a relative, escaped path (``pages.href``). ``tell`` hears of a kept foreign index.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = [_index_entry(root, path) for path in sorted(root.glob("*/*/manifest.json")) if _listed(root, path)]
    runs += [_importance_entry(root, path) for path in sorted([*root.glob("*/importance.json"),
                                                               *root.glob("*/*/importance.json")])
             if _listed(root, path)]
    runs.sort(key=lambda run: (run["study"], run["version"]), reverse=True)
    runs.sort(key=lambda run: run["study"])  # studies A-Z, newest version first within each
    history = [
        {"study": run["study"], "version": run["version"], "created": run["created"],
         "panel": f"{h['task']} · {h['metric']}", "kind": h["kind"], "value": h["dense"],
         "ci_low": (h["dense_ci"] or [None])[0], "ci_high": (h["dense_ci"] or [None, None])[1]}
        for run in runs for h in run.get("headline", []) if isinstance(h, dict) and h.get("dense") is not None
    ]
    chart = baseline_history_chart(history)
    specs = {"dense_history": chart.to_dict()} if chart is not None else {}
    index = index_file(root)
    if index.name != INDEX and tell:
        tell(f"kept {root / INDEX} (prunelab did not write it); prunelab's index is {index}")
    _write_text(index, pages.index_page(runs, specs))
    return index


def _listed(root: Path, path: Path) -> bool:
    """A run or importance file the index lists: not in a hidden (staging) folder, not through a link."""
    if path.parent.name.startswith("."):
        return False
    try:
        refuse_links(root, path)
    except PrunelabError:
        return False
    return True


def _index_entry(root: Path, manifest_path: Path) -> dict[str, Any]:
    study, version = manifest_path.parent.parent.name, manifest_path.parent.name
    entry: dict[str, Any] = {"study": study, "version": version, "created": None,
                             "report": pages.href(study, version, "report.html")}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {**entry, "error": f"unreadable manifest.json: {err}"}
    if not isinstance(manifest, dict):
        return {**entry, "error": "unreadable manifest.json: not an object"}
    keep = ("created", "model", "strategies", "tasks", "headline")
    return {**entry, **{k: manifest[k] for k in keep if k in manifest}}


def _importance_entry(root: Path, summary_path: Path) -> dict[str, Any]:
    """An importance run (``prunelab importance --out``): its folder, or ``<study>/<version>/`` when versioned."""
    folder = summary_path.parent
    nested = folder.parent != root
    study = folder.parent.name if nested else folder.name
    created = datetime.fromtimestamp(summary_path.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry: dict[str, Any] = {"study": study, "version": folder.name if nested else "(unversioned)",
                             "created": created, "kind": "importance",
                             "report": pages.href(*(folder / "importance.html").relative_to(root).parts)}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {**entry, "error": f"unreadable importance.json: {err}"}
    manifest = summary.get("manifest") or {}
    entry.update({k: manifest[k] for k in ("version", "created") if manifest.get(k)})
    model = summary.get("model")
    order = summary.get("order") or {}
    ranked = "; ".join(f"{metric}: drop first {', '.join(map(str, layers[:4]))}" for metric, layers in order.items())
    rho = [f"{c.get('importance_metric')} vs {c.get('task')} ρ={c['spearman']:+.2f}"
           for c in summary.get("spearman_vs_sweep") or [] if c.get("spearman") is not None]
    return {**entry, "model": Path(model).name if model else None,
            "summary": "Layer importance. " + ranked + (f". Spearman with the measured sweep: {'; '.join(rho)}" if rho else "")}


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary name so a reader never sees half a file."""
    atomic_write(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
