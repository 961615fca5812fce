"""`jaxflow demo`: the whole analysis on the shipped toy LLaVA, end to end, on a CPU in a few minutes.

Steps (each resumable: an existing step's output is reused):
1. convert the shipped llava-hf checkpoint (`jaxflow/assets/toy-llava`) into a jaxflow model;
2. generate toy-world samples (task CSVs in the GQA schema + images; `jaxflow.world`);
3. per task: knockout sweep of the study's six flows at every layer, and the logit lens; on one task (ChooseAttr),
   causal tracing with the image noised (ROME's procedure: restore the clean activations per site, layer and region);
4. plots, summary tables, `report.md` (what changes where, next to the study's findings) and `report.html`
   (`jaxflow report`: the figures and tables in one self-contained file).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy-llava")
SAMPLES_PER_TASK = 100
SEED = 1234  # demo data: neither the training (0) nor the held-out (1) seed of the shipped model
TRACE_TASK, TRACE_CORRUPT, TRACE_SAMPLES = "ChooseAttr", "image-noise", 40  # the demo's causal tracing


def demo_window(num_layers: int) -> int:
    """The study's window, k = 7 of 32 layers, scaled to the model's depth (at least one layer)."""
    return max(1, round(7 * num_layers / 32))


def run(out: str, samples_per_task: int = SAMPLES_PER_TASK, seed: int = SEED, model_src: str = ASSET,
        batch: int = 8, progress: bool = True) -> dict:
    """Runs the demo into `out`; returns {"report": report.md's path, "html": report.html's path, "plots": [...],
    "summary": {...}, "seconds": s}."""
    start = time.time()
    os.makedirs(out, exist_ok=True)

    @contextlib.contextmanager
    def step(n: int, text: str):
        """`[n/4] text` as the step starts, `[n/4] done in S s` with its duration as it ends."""
        print(f"[{n}/4] {text}", flush=True)
        began = time.time()
        yield
        print(f"[{n}/4] done in {time.time() - began:.1f} s", flush=True)

    import jaxflow
    from jaxflow import report as html_report
    from jaxflow.convert import convert
    from jaxflow.gallery import gallery
    from jaxflow.sweep import plots
    from jaxflow.sweep import run as sweep_run
    from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow
    from jaxflow.sweep.trace import trace
    from jaxflow.world import TASKS, generate

    model_dir = os.path.join(out, "model")
    with step(1, f"converting {model_src} -> {model_dir}"):
        if not os.path.exists(model_dir):
            convert(model_src, model_dir, progress=progress)
        model = jaxflow.load(model_dir)

    data_dir = os.path.join(out, "data")
    with step(2, f"generating {samples_per_task} toy-world questions per task (seed {seed}) -> {data_dir}"):
        paths = _generate_once(generate, data_dir, samples_per_task, seed)

    k = demo_window(model.config.text.num_layers)
    flows = [parse_flow(name) for name in STUDY_FLOWS]
    summaries = {}
    with step(3, f"sweeping {len(flows)} flows x {model.config.text.num_layers} layers (window {k}) and the logit "
              f"lens; causal tracing of {TRACE_TASK} ({TRACE_CORRUPT})"):
        for task in TASKS:
            common = dict(flows=flows, window_size=k, batch=batch, images=os.path.join(data_dir, "images"),
                          progress=progress)
            summaries[task] = sweep_run.sweep(model, paths[task], os.path.join(out, "runs", "sweep", task), **common)
            sweep_run.sweep(model, paths[task], os.path.join(out, "runs", "lens", task), lens=True, **common)
        trace(model, paths[TRACE_TASK], os.path.join(out, "runs", "trace", TRACE_TASK), corrupt=TRACE_CORRUPT,
              window_size=k, limit=min(samples_per_task, TRACE_SAMPLES), images=os.path.join(data_dir, "images"),
              batch=batch, progress=progress)

    plot_dir = os.path.join(out, "plots")
    with step(4, f"plotting -> {plot_dir}"):
        written = plots.plot(os.path.join(out, "runs"), plot_dir)
        report = write_report(out, model, summaries, k, samples_per_task, seed, _training_metrics(model_src))
        items, _ = gallery([os.path.join(out, "runs")], per_task=1)
        report_html = html_report.write_report(os.path.join(out, "report.html"), [os.path.join(out, "runs")], items,
                                               title="jaxflow demo report")
    seconds = time.time() - start
    print(f"\ndone in {seconds:.0f} s\n  report:  {report}\n  html:    {report_html}\n  plots:   {plot_dir}\n"
          f"  results: {os.path.join(out, 'runs')}\n  data:    {data_dir}\n  model:   {model_dir}")
    return {"report": report, "html": report_html, "plots": written, "summary": summaries, "seconds": seconds}


def _generate_once(generate, data_dir: str, n: int, seed: int) -> dict:
    """The data set, generated once: a finished one (marked by data.json) is reused."""
    from jaxflow.world import TASKS

    marker = os.path.join(data_dir, "data.json")
    paths = {task: os.path.join(data_dir, f"{task}.csv") for task in TASKS}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == {"samples_per_task": n, "seed": seed}:
                return paths
        raise FileExistsError(f"{data_dir}: holds another demo data set ({marker}); choose another --out")
    generate(data_dir, n, seed)
    with open(marker, "w") as f:
        json.dump({"samples_per_task": n, "seed": seed}, f)
    return paths


def _training_metrics(model_src: str) -> dict | None:
    path = os.path.join(model_src, "training_metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_report(out: str, model, summaries: dict, k: int, n: int, seed: int, metrics: dict | None = None) -> str:
    """report.md: accuracy on the demo samples, per task and flow the layer of the largest drop, the plots."""
    from jaxflow.sweep import plots

    curves = plots.flow_curves(plots._read(os.path.join(out, "runs", "sweep", "**", "results.csv")))
    num_layers = model.config.text.num_layers
    lines = [
        "# jaxflow demo report", "",
        f"Model: `{model.path}` (the shipped toy LLaVA, {num_layers} language layers). Data: {n} toy-world "
        f"questions per task, seed {seed}. Knockout window: {k} layer(s) around each layer (the study's 7 of 32, "
        "scaled). Metric: relative change (%) of the probability of the model's first answer token when the "
        "target positions cannot attend to the source positions, averaged over the samples the model answers "
        "correctly (the study's filter).", "",
    ]
    if metrics:
        acc = ", ".join(f"{task} {v:.2f}" for task, v in metrics["accuracy"].items())
        lines += [f"Held-out accuracy of the model (its card, {metrics['heldout_questions']} questions): {acc}.", ""]
    lines += ["## Samples", "", "| task | answered correctly (kept) | skipped |", "| --- | --- | --- |"]
    for task, s in summaries.items():
        lines.append(f"| {task} | {s['kept']} / {s['kept'] + s['skipped']} | {s['skipped']} |")
    flows = plots.flow_names(curves)
    drops = {(r["task"], r["flow"]): f"{r['largest_drop_pct']:+.1f} (L{r['largest_drop_layer']})"
             for r in plots.summary_rows(curves)}
    lines += ["", "## Largest drop per flow (mean relative change, %, and its layer)", "",
              "| task | " + " | ".join(flows) + " |", "| --- |" + " --- |" * len(flows)]
    for task in sorted(curves):
        lines.append(f"| {task} | " + " | ".join(drops.get((task, flow), "-") for flow in flows) + " |")
    lines += ["", "## Plots", ""]
    for task in sorted(curves):
        lines.append(f"- {task}: [flows](plots/flows_{task}.png), [logit lens](plots/lens_{task}.png)")
    lines += ["- every task: [flows_all_tasks](plots/flows_all_tasks.png)", ""]
    lines += _trace_lines(out)
    lines += [
              "## The study's findings on LLaVA, for comparison", "",
              "1. lower layers: Image -> Question matters most (general visual information enters the question);",
              "2. middle layers: Related image patches -> Question hurts far more than Other image patches ->",
              "   Question;",
              "3. middle-to-higher layers: Question -> Last matters, Image -> Last has little direct effect;",
              "4. logit lens: the answer's probability rises in the middle-to-late layers.",
              "", "`jaxflow/assets/toy-llava/FINDINGS.md` reads the shipped model's results against them."]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _trace_lines(out: str) -> list[str]:
    """report.md's causal-tracing section: per site, the region and layer of the largest mean indirect effect."""
    from jaxflow.sweep import plots

    stats = plots.trace_stats(plots._read(os.path.join(out, "runs", "trace", "**", "tracing.csv")))
    key = (TRACE_TASK, TRACE_CORRUPT, "exact")
    if key not in stats:
        return [f"## Causal tracing ({TRACE_TASK}, {TRACE_CORRUPT})", "", "No sample kept.", ""]
    lines = [f"## Causal tracing ({TRACE_TASK}, {TRACE_CORRUPT})", "",
             "The image embeddings noised (3x their standard deviation), then the clean run's activations restored "
             "at one site, in one region, in a window of layers; indirect effect = p_restored - p_corrupt of the "
             "answer. Per site, the largest mean effect:", "",
             "| site | region | layer | mean indirect effect | samples |", "| --- | --- | --- | --- | --- |"]
    for site, regions in stats[key].items():
        region, (layers, mean, ci, n) = max(regions.items(), key=lambda item: item[1][1].max())
        i = int(mean.argmax())
        lines.append(f"| {site} | {region} | {int(layers[i])} | {mean[i]:+.3f} ± {ci[i]:.3f} | {n} |")
    name = "trace_" + "_".join(key)
    return lines + ["", f"Heat maps: [every site](plots/{name}.png); per site: "
                    + ", ".join(f"[{site}](plots/{name}_{site}.png)" for site in stats[key]), ""]
