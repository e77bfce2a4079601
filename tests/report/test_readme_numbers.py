"""Every number README's results section quotes is read from the committed artifacts (issue #26).

Each claim below recomputes a phrase of README from the runs' summary, manifest or correlation
files and requires it verbatim (whitespace normalised); then every measured-looking number in the
section (a decimal, a percentage, a thousands separator, or one above 24) must lie inside one of
those checked phrases, so a number typed by hand without a check here fails the test. When a run is
rebuilt under other statistics and a number changes, this test names the sentence to update.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from prunelab.report.stats import BETTER, BEYOND, NO_CHANGE, WORSE, accuracy_mdd, pairs_needed

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
LAYERS = ARTIFACTS / "qwen2.5-layers" / "20261203T212900Z-9de8ce6-74bb8b90"
LAYERS_8 = ARTIFACTS / "qwen2.5-layers" / "20261128T185805Z-7e4c1a5-258cdca8"
SPARSITY = ARTIFACTS / "qwen2.5-sparsity" / "20261128T195008Z-56affbe-06dfa272"
MMLU = ARTIFACTS / "qwen2.5-mmlu" / "20261201T074420Z-3e9815b-8710dd0e"
IMPORTANCE = ARTIFACTS / "qwen2.5-importance"
WIDTH = ARTIFACTS / "smollm2-width" / "20261207T023048Z-a649cc4-7d05ca25"

# numbers that describe the set-up rather than a measurement, and are not in an artifact
SETUP = {"0.5", "0.05", "2.5", "4096", "0.012", "10", "5", "34"}


def section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### Results: the committed example")
    return " ".join(text[start:text.index("### Plugins", start)].split())


def summary(run: Path) -> pl.DataFrame:
    return pl.read_parquet(run / "summary.parquet")


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text(encoding="utf-8"))


def layer(row: dict) -> int:
    return json.loads(row["params"])["layers"]


def pct(rel: float) -> str:
    return f"{100 * rel:+.1f} %"


def number(value: float) -> str:
    """Perplexities as README writes them: one decimal below 1000, whole with separators above."""
    return f"{value:.1f}" if value < 1000 else f"{round(value):,}"


def floor2(p: float) -> str:
    return f"{math.floor(p * 100) / 100:g}"


def by_layer(frame: pl.DataFrame) -> dict[int, dict]:
    return {layer(r): r for r in frame.filter(pl.col("strategy") == "drop-layers").iter_rows(named=True)}


def layer_claims() -> Iterator[str]:
    s, config = summary(LAYERS), manifest(LAYERS)["config"]["evaluation"]["tasks"]["wikitext"]
    assert config["sample"] == "random"
    yield f"run of {manifest(LAYERS)['created'][:10]}, `artifacts/qwen2.5-layers/{LAYERS.name}`"
    yield f"on {config['limit']} random windows x {config['seqlen']} tokens; Holm over {24} removals"
    ppl, kl, top1 = (s.filter(metric=m) for m in ("perplexity", "kl_mean", "top1_agree"))
    yield f"Dense perplexity {ppl.filter(strategy='dense')['value'][0]:.3g}."
    kl_rows, top1_rows = by_layer(kl), by_layer(top1)
    low = min(kl_rows.values(), key=lambda r: r["value"])
    high = max(kl_rows.values(), key=lambda r: r["value"])
    yield (f"KL(dense || variant) ranges from {low['value']:.3g} nats (layer {layer(low)}) to "
           f"{high['value']:.4g} (layer {layer(high)})")
    best = max(top1_rows.values(), key=lambda r: r["value"])
    worst = min(top1_rows.values(), key=lambda r: r["value"])
    yield (f"at most {100 * best['value']:.1f} % of tokens (layer {layer(best)}; layer {layer(worst)}: "
           f"{100 * worst['value']:.1f} %)")
    beyond = [r for r in [*kl_rows.values(), *top1_rows.values()] if r["verdict"] == BEYOND]
    assert len(beyond) == 48
    yield (f"all {len(kl_rows)} removals are beyond the tolerance of {kl['tolerance'].drop_nulls()[0]:g} nats (and of "
           f"{round(100 * top1['tolerance'].drop_nulls()[0])} point of changed top tokens), "
           f"Holm p = {max(r['p_holm'] for r in beyond):.2g}")
    rows = by_layer(ppl)
    quiet = sorted(i for i, r in rows.items() if r["verdict"] == NO_CHANGE)
    yield f"Without layer {', '.join(map(str, quiet[:-1]))} or {quiet[-1]} the median per-window change is " + \
        ", ".join(pct(rows[i]["rel_change"]) for i in quiet[:-1]) + f" and {pct(rows[quiet[-1]]['rel_change'])}"
    yield f"(Holm p >= {floor2(min(rows[i]['p_holm'] for i in quiet))})"
    yield ", ".join(pct(rows[i]["mdd"] / rows[i]["dense_value"]) for i in quiet[:-1]) + \
        f" and {pct(rows[quiet[-1]]['mdd'] / rows[quiet[-1]]['dense_value'])} for these four"
    (better,) = [i for i, r in rows.items() if r["verdict"] == BETTER]
    yield (f"Without layer {better} perplexity is {-100 * rows[better]['rel_change']:.1f} % *lower* "
           f"(Holm p = {rows[better]['p_holm']:.2g}) while its top token differs from dense's on "
           f"{round(100 * (1 - top1_rows[better]['value']))} % of tokens")
    worse = sorted((r["rel_change"], i) for i, r in rows.items() if r["verdict"] == WORSE)
    yield f"{len(worse)} removals are significantly worse"
    (_, a), (_, b) = worse[:2]
    yield f"from layer {a} ({pct(rows[a]['rel_change'])}) and layer {b} ({pct(rows[b]['rel_change'])})"
    last = max(rows)
    yield (f"to layer 1 ({pct(rows[1]['rel_change'])}), layer 2 ({pct(rows[2]['rel_change'])}), the last layer, "
           f"{last} ({pct(rows[last]['rel_change'])}), and layer 0 (x{round(rows[0]['rel_change'] + 1):,}; "
           f"perplexity {number(rows[0]['value'])})")
    assert worse[-1][1] == 0 and worse[-2][1] == last and worse[-3][1] == 2 and worse[-4][1] == 1
    not_worse = sorted(i for i, r in rows.items() if r["verdict"] != WORSE)
    yield f"by perplexity, layers {', '.join(map(str, not_worse[:-1]))} and {not_worse[-1]};"


def importance_claims() -> Iterator[str]:
    with (IMPORTANCE / "correlation.csv").open() as handle:
        rho = {r["importance_metric"]: float(r["spearman"]) for r in csv.DictReader(handle)}
    calibration = json.loads((IMPORTANCE / "importance.json").read_text())["calibration"]
    yield f"{calibration['samples']} x {calibration['seqlen']} calibration tokens"
    yield (f"perplexity without the layer {rho['ppl']:.2f}, ShortGPT's Block Influence {rho['bi']:.2f}, "
           f"angular distance {rho['angular']:.2f}")


def sparsity_claims() -> Iterator[str]:
    m = manifest(SPARSITY)
    windows = m["config"]["evaluation"]["tasks"]["wikitext"]
    assert windows["sample"] == "first"
    yield f"the first {windows['limit']} windows of {windows['seqlen']} tokens; calibration " \
          f"{m['config']['calibration']['samples']} x {m['config']['calibration']['seqlen']} tokens"
    ppl = summary(SPARSITY).filter(metric="perplexity")
    value = {(r["strategy"], json.loads(r["params"]).get("sparsity"), json.loads(r["params"]).get("order")): r["value"]
             for r in ppl.iter_rows(named=True)}
    mag = {s: value[("magnitude", s, "smallest")] for s in (10, 20, 30, 40, 50, 60, 80)}
    yield f"costs little at 10 % ({number(mag[10])}) and 20 % ({number(mag[20])})"
    yield (f"30 % {number(mag[30])}, 40 % {number(mag[40])}, 50 % {number(mag[50])}, 60 % {number(mag[60])}, "
           f"80 % {number(mag[80])}")
    yield f"Wanda ({number(value[('wanda', 50, None)])}) and SparseGPT ({number(value[('sparsegpt', 50, None)])})"
    yield f"destroys the model ({number(value[('magnitude', 10, 'largest')])})"
    pruned = ppl.filter(pl.col("strategy") != "dense")
    assert set(pruned["verdict"]) == {"underpowered"}
    yield f"With {windows['limit']} windows and {pruned.height} variants the exact test is underpowered " \
          f"(it needs at least {pairs_needed(pruned.height)} windows)"
    gsm = summary(SPARSITY).filter(metric="exact_match_strict")
    dense = gsm.filter(strategy="dense").row(0, named=True)
    assert set(gsm.filter(pl.col("strategy") != "dense")["verdict"]) == {"underpowered"}
    yield f"first {dense['n']} problems, strict and flexible): dense solves {dense['correct']} of {dense['n']}"


def mmlu_claims() -> Iterator[str]:
    m, s = manifest(MMLU), summary(MMLU)
    subset = m["config"]["evaluation"]["tasks"]["mmlu"]
    dense = s.filter(strategy="dense").row(0, named=True)
    yield (f"the first {subset['limit']} questions of each of the {dense['n'] // subset['limit']} subjects, "
           f"{dense['n']} in all; {round(m['timings']['wall_s'] / 60)} minutes on one core")
    yield (f"answers {dense['correct']} of {dense['n']} ({dense['value']:.3f} [{dense['ci_low']:.3f}, "
           f"{dense['ci_high']:.3f}])")
    pruned = s.filter(pl.col("strategy") != "dense")
    yield f"{pruned['correct'].min()}-{pruned['correct'].max()} of {dense['n']}"
    old0 = summary(LAYERS_8).filter(variant="drop-layers[layers=0]")["value"][0]
    sparse = summary(SPARSITY).filter(variant="magnitude[sparsity=80,order=smallest]", metric="perplexity")["value"][0]
    correct = dict(zip(pruned["variant"], pruned["correct"], strict=True))
    yield (f"layer 0 (perplexity {number(old0)} on the 8-window run) it answers {correct['drop-layers[layers=0]']}, "
           f"at 80 % magnitude sparsity (perplexity {number(sparse)}) {correct['magnitude[sparsity=80,order=smallest]']}")
    assert set(pruned["verdict"]) == {NO_CHANGE}
    yield f"every p >= {floor2(pruned['p_value'].min())} before Holm, {pruned['p_holm'].min():g} after"
    (headline,) = m["headline"]
    yield f"is {pct(headline['mdd'] / dense['value'])} to {pct(headline['mdd_max'] / dense['value'])} of dense's accuracy"
    blind = [r["lost"] + r["gained"] for r in pruned.iter_rows(named=True) if r["mdd"] is None]
    family = pruned.height
    assert all(accuracy_mdd(dense["n"], d, family) is None for d in range(max(blind) + 1))
    yield f"with at most {max(blind)} changed answers could show none"
    letters = {r["variant"]: r for r in m["sensitive_metrics"]["answer_letters"]}
    yield (f'answers "B" to {letters["dense"]["B"]} of the {dense["n"]} questions, and without layer 0 it answers '
           f'"C" to {letters["drop-layers[layers=0]"]["C"]}')
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "both tools give 0.269 (46/171)" in benchmarks
    yield "question for question: 0.269, see BENCHMARKS.md"


def width_claims() -> Iterator[str]:
    m, s = manifest(WIDTH), summary(WIDTH)
    windows = m["config"]["evaluation"]["tasks"]["wikitext"]
    assert windows["sample"] == "random"
    yield f"`artifacts/smollm2-width/{WIDTH.name}`"
    yield f"on {windows['limit']} random windows x {windows['seqlen']} tokens; no healing"
    ppl = s.filter(metric="perplexity")
    yield f"Dense perplexity {ppl.filter(strategy='dense')['value'][0]:.3g}."
    size = pl.read_parquet(WIDTH / "equal_size.parquet")
    assert set(size["verdict"]) == {"best (Holm p<0.05)"} and size["best_method"].unique().to_list() == ["width mlp"]
    yield (f"in each the best is MLP width, by perplexity, KL to dense and same top token alike, tested "
           f"against the runner-up (Holm p <= {size['p_holm'].max():.2g} over the bins)")
    rows = size.filter(metric="perplexity").sort("kept_low", descending=True).to_dicts()
    assert [r["kept_low"] for r in rows] == [90.0, 85.0, 75.0]
    yield (f"{rows[0]['best_kept']:.1f} % of dense's parameters kept, perplexity {number(rows[0]['best_value'])} "
           f"against drop-block k=3's {number(rows[0]['runner_value'])} ({rows[0]['runner_kept']:.1f} % kept)")
    yield (f"{rows[1]['best_kept']:.1f} %, {number(rows[1]['best_value'])} against k=5's "
           f"{number(rows[1]['runner_value'])} ({rows[1]['runner_kept']:.1f} %)")
    assert rows[0]["runner_variant"] == "drop-block[k=3]" and rows[1]["runner_variant"] == "drop-block[k=5]"
    assert rows[2]["runner_method"] == "width mlp+hidden" and "drop-block[k=9]" in rows[2]["others"]
    deep = ppl.filter(variant="drop-block[k=9]")["value"][0]
    yield (f"{rows[2]['best_kept']:.1f} %, {number(rows[2]['best_value'])} against combined width's "
           f"{number(rows[2]['runner_value'])} ({rows[2]['runner_kept']:.1f} %) and k=9's {number(deep)}")
    yield ("better again (" + ", ".join(number(r["reference_value"]) for r in rows) + ")")
    bench = pl.read_parquet(WIDTH / "bench.parquet")
    zeros = bench.filter(pl.col("strategy") == "magnitude")["decode_speedup"]
    yield f"its measured decode speed is dense's (x{zeros.min():.2f}-{zeros.max():.2f} here, timing noise)"
    speed = pl.read_parquet(WIDTH / "equal_speed.parquet").filter(metric="perplexity").sort("speed_low")
    (fast,) = [r for r in speed.to_dicts() if r["verdict"] == "best (Holm p<0.05)"]
    assert fast["runner_variant"] == "drop-block[k=3]"
    yield (f"at x{(fast['speed_low'] + fast['speed_high']) / 2:.1f}, MLP width ({number(fast['best_value'])}, "
           f"x{fast['best_speedup']:.2f}) beats drop-block k=3 ({number(fast['runner_value'])}, "
           f"x{fast['runner_speedup']:.2f}), Holm p = {fast['p_holm']:.2g}")


CLAIMS: list[Callable[[], Iterator[str]]] = [layer_claims, importance_claims, sparsity_claims, mmlu_claims,
                                              width_claims]


@pytest.mark.parametrize("claims", CLAIMS, ids=lambda c: c.__name__)
def test_each_quoted_number_matches_the_artifacts(claims):
    text = section()
    for phrase in claims():
        assert " ".join(phrase.split()) in text, f"README results section should say: {phrase!r}"


MEASURED = re.compile(r"(?<![\w.-])[-+x]?\d[\d,]*(?:\.\d+)?(?: ?%)?")


def test_no_number_in_the_results_section_is_unchecked():
    text = re.sub(r"`[^`]*`|\[[^\]]*\]\([^)]*\)", " ", section())  # paths and links name files, not results
    checked = " ".join(" ".join(p.split()) for claims in CLAIMS for p in claims())
    unchecked = []
    for match in MEASURED.finditer(text):
        token = match.group().lstrip("+-x").rstrip(" %")
        measured = "." in token or "," in token or match.group().endswith("%") or float(token.replace(",", "")) > 24
        if measured and token not in SETUP and token not in checked:
            unchecked.append(match.group())
    assert not unchecked, f"numbers in README's results section that no claim checks: {unchecked}"
