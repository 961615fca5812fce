"""The `jaxflow` command.

A user error (bad path, bad flag value, wrong kind of file, unsupported config, damaged model, busy
results directory) prints one line, `jaxflow <command>: error: ...`, and exits with status 2, as
argparse does for bad usage; `--debug` shows the traceback instead. Every jaxflow error class
subclasses ValueError or OSError (ConversionError, UnsupportedConfigError, CheckpointIntegrityError,
RunMismatchError, RegionError, ExportError, ...), so those two catch them all (an internal error of those
types prints one line too; `--debug` shows where it came from). A sweep or lens that records no sample exits
with status 1, its counts and most common skip reasons on one line; jaxflow's own warnings print as one line,
`jaxflow <command>: warning: ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings

USER_ERRORS = (ValueError, OSError)


def _convert(args) -> int:
    from jaxflow.convert import convert

    out = convert(args.src, args.out, clip=args.clip, dtype=args.dtype, allow_pickle=args.allow_pickle,
                  vision_tower=args.vision_tower)
    print(f"converted {args.src} -> {out}")
    return 0


def _verify(args) -> int:
    from jaxflow import checkpoint

    start = time.time()
    summary = checkpoint.verify(args.model)
    print(f"{args.model}: all {summary['groups']} parameter groups ({summary['bytes'] / 2**30:.3f} GiB) hold what "
          f"they held at conversion ({checkpoint.HASH} digests match; {time.time() - start:.1f} s)")
    return 0


def _demo(args) -> int:
    from jaxflow import demo

    demo.run(args.out, samples_per_task=args.samples_per_task, seed=args.seed)
    return 0


def _load_for_run(args, check_inputs):
    """The model of a sweep, lens or trace, after `check_inputs()` (what needs no model) and joining the
    multi-process runtime when asked."""
    import jaxflow
    from jaxflow import sharding

    check_inputs()  # before the (possibly long) model load
    if args.distributed or args.coordinator:
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    mesh = sharding.make_mesh(args.mesh) if args.mesh or len(jax.local_devices()) > 1 else None
    return jaxflow.load(args.model, mesh=mesh, no_anyres=args.no_anyres)


def _summary(args, summary: dict) -> int:
    counts = f"{summary['kept']} samples recorded, {summary['skipped']} skipped"
    if summary["kept"] == 0:  # nothing to plot: a wrong --images, task file or model, not a result
        reasons = ", ".join(f"{kind} ({n})" for kind, n in summary["skip_reasons"])
        why = f"; most common skip reasons: {reasons}" if reasons else "; the task file has no rows"
        print(f"jaxflow {args.command}: error: {counts} (see {os.path.join(args.out, 'skipped.csv')}){why}",
              file=sys.stderr)
        return 1
    print(f"{counts} (see skipped.csv), {len(summary['compiled_shapes'])} batch shapes {summary['compiled_shapes']}; "
          f"results in {args.out}")
    return 0


def _common(args) -> dict:
    """The keyword arguments a sweep, lens and trace share."""
    return dict(batch=args.batch, limit=args.limit, images=args.images, template=args.template,
                filter_correct=not args.keep_incorrect, max_new_tokens=args.max_new_tokens,
                related_patches=args.related_patches)


def _sweep(args) -> int:
    from jaxflow.sweep import flows as sweep_flows
    from jaxflow.sweep import run

    flows = [sweep_flows.parse_flow(f) for f in (args.flows or list(sweep_flows.STUDY_FLOWS))]  # lens: the defaults
    model = _load_for_run(args, lambda: run.check_inputs(args.data, args.images))
    return _summary(args, run.sweep(model, args.data, args.out, flows=flows, window_size=args.window,
                                    method=args.method, chunk=args.chunk, lens=args.command == "lens",
                                    **_common(args)))


def _trace(args) -> int:
    from jaxflow.sweep import run
    from jaxflow.sweep import trace as tracing

    sites, regions = args.sites.split(","), args.regions.split(",")

    def check():
        tracing.check_trace(args.corrupt, sites, regions, args.method, args.data)
        run.check_inputs(args.data, args.images)

    model = _load_for_run(args, check)
    return _summary(args, tracing.trace(model, args.data, args.out, corrupt=args.corrupt, sites=sites, regions=regions,
                                        window_size=args.window, method=args.method, chunk=args.chunk,
                                        noise_scale=args.noise_scale, noise_seed=args.noise_seed, **_common(args)))


def _plot(args) -> int:
    from jaxflow.sweep.plots import plot

    if not os.path.isdir(args.results):
        raise FileNotFoundError(f"{args.results}: no such directory")
    for path in plot(args.results, args.out):
        print(path)
    return 0


def _report(args) -> int:
    from jaxflow.report import write_report

    items = []
    if args.gallery:
        from jaxflow.gallery import gallery

        items, problems = gallery(args.runs, args.gallery)
        for problem in problems:
            print(f"jaxflow report: note: {problem}", file=sys.stderr)
    print(write_report(args.out, args.runs, items, title=args.title))
    return 0


def _export(args) -> int:
    from jaxflow.sweep.export import export_study, export_tracing

    if not (args.study or args.tracing):
        raise ValueError("--study OUT (knockout sweeps) or --tracing FILE (causal tracing): say what to write")
    written = export_study(args.study, args.runs, model=args.model_name) if args.study else []
    written += export_tracing(args.tracing, args.runs) if args.tracing else []
    for path in written:
        print(path)
    return 0


def demo_defaults() -> tuple[int, int]:
    from jaxflow import demo

    return demo.SAMPLES_PER_TASK, demo.SEED


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from jaxflow.inputs.images import RELATED_PATCH_RULES
    from jaxflow.inputs.prompts import TEMPLATES

    parser = argparse.ArgumentParser(prog="jaxflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, help="the command (jaxflow COMMAND --help: its flags)")
    p = sub.add_parser("convert", help="convert a LLaVA checkpoint into a jaxflow model directory")
    p.add_argument("src", help="checkpoint directory (config.json + *.safetensors) or one .safetensors file")
    p.add_argument("out", help="output directory (must not exist; written atomically)")
    p.add_argument("--clip", help="CLIP checkpoint directory, for the original LLaVA layout (vision config, image "
                   "processor, and the tower unless the checkpoint's own trained tower is used)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the stored parameters, and of the computation (norms, attention scores and "
                   "probabilities stay float32): float32 (default); bfloat16 or float16 halve the size; float16 is "
                   "converted as asked, but its range ends at 65504: activations past it overflow, and a sweep "
                   "then skips the samples whose probabilities are not finite (skipped.csv says so)")
    p.add_argument("--allow-pickle", action="store_true", help="read PyTorch pickle checkpoints (pytorch_model*.bin) "
                   "with PyTorch's weights-only loader (needs torch); refused by default")
    p.add_argument("--vision-tower", default="auto", choices=["auto", "checkpoint", "clip"],
                   help="original layout: the tower stored in the checkpoint or the --clip one (default: as LLaVA "
                   "runs it: the stored tower when the config or the tensors say it was trained)")
    p.set_defaults(func=_convert)
    p = sub.add_parser("verify", help="re-hash a converted model's parameters against the digests recorded when "
                       "it was converted")
    p.add_argument("model", help="converted model directory")
    p.set_defaults(func=_verify)
    from jaxflow.sweep.trace import CORRUPTIONS, TRACE_REGIONS, TRACE_SITES, WINDOW

    for name, what in (("sweep", "attention-knockout sweep over flows x layers"),
                       ("lens", "logit lens at the last position"),
                       ("trace", "causal tracing: restore clean activations into a corrupted run, per site, layer "
                        "window and region")):
        p = sub.add_parser(name, help=f"{what} on a GQA task file")
        p.add_argument("--model", required=True, help="converted model directory")
        p.add_argument("--data", required=True, help="task CSV (GQA task-file schema), or a packaged study task: "
                       "ChooseAttr, ChooseCat, ChooseRel, CompareAttr, LogicalObj, QueryAttr")
        p.add_argument("--images", help="image folder holding <img_id>.jpg")
        p.add_argument("--out", required=True, help="results directory (resumed if it exists)")
        if name == "sweep":
            p.add_argument("--flows", nargs="+", help="flows: the study's names (e.g. 'Image->Question') or "
                           "region pairs 'source->target', optionally '@h1,h2' for a head subset (default: the six)")
            p.add_argument("--window", type=positive_int, default=9,
                           help="layers cut around each layer (default 9; at least the model's layers warns)")
        if name == "trace":
            p.add_argument("--corrupt", required=True, choices=list(CORRUPTIONS),
                           help="the corrupted run: noise on the image or question embeddings (ROME), or each row's "
                           "counterfactual image (task-file column counterfactual_image: an image id in --images)")
            p.add_argument("--sites", default=",".join(TRACE_SITES),
                           help=f"comma-separated sites to restore (default {','.join(TRACE_SITES)})")
            p.add_argument("--regions", default=",".join(TRACE_REGIONS),
                           help=f"comma-separated regions to restore at (default {','.join(TRACE_REGIONS)})")
            p.add_argument("--window", type=positive_int, default=WINDOW,
                           help=f"layers attn_out and mlp_out restore around each layer (default {WINDOW}, ROME's); "
                           "resid_pre restores one layer")
            p.add_argument("--method", choices=["exact", "attribution"], default="exact",
                           help="'exact' (default: every restoration run, exact incremental recomputation) or "
                           "'attribution' (attribution patching's linear estimate from one forward and backward)")
            p.add_argument("--noise-scale", type=float, default=3.0,
                           help="noise std in units of the modality's embedding std (default 3, ROME's)")
            p.add_argument("--noise-seed", type=int, default=0,
                           help="seed of the noise; each sample's is derived from it and its question_id")
        p.add_argument("--batch", type=positive_int, default=4, help="samples per compiled call (default 4)")
        if name == "sweep":
            p.add_argument("--method", choices=["incremental", "full"], default="incremental",
                           help="'incremental' (default: exact recomputation of only what a cut changes, from its "
                           "window's first layer and first target position on) or 'full' (a whole forward per "
                           "configuration: the same numbers up to rounding, slower)")
        if name != "lens":
            p.add_argument("--chunk", type=positive_int,
                           help="configurations per call (default: what fits in memory)")
        p.add_argument("--limit", type=positive_int, help="only the first N rows")
        p.add_argument("--template", choices=TEMPLATES,
                       help="prompt template (default: the checkpoint's, from its chat template, vocabulary or name)")
        p.add_argument("--keep-incorrect", action="store_true", help="keep samples the model answers wrongly")
        p.add_argument("--max-new-tokens", type=positive_int, default=128,
                       help="greedy answers are decoded until EOS, at most this many tokens (default 128, as the "
                       "study); an answer without EOS within it is skipped")
        p.add_argument("--no-anyres", action="store_true",
                       help="LLaVA-NeXT checkpoints: LLaVA-1.5 image handling (pad to a square, one crop, no "
                       "image_newline), as the study's --noHD_noPad")
        if name != "lens":
            p.add_argument("--related-patches", choices=RELATED_PATCH_RULES, default="study",
                           help="related image patches: 'study' (the study's rule: a patch of the preprocessed "
                                "red-box mask stays pure red) or 'overlap' (the patch overlaps the transformed box)")
        else:  # what run.json records for a lens (a resumed lens compares them), without flags that do nothing
            p.set_defaults(flows=None, window=9, method="incremental", chunk=None, related_patches="study")
        p.add_argument("--mesh", help="device mesh of this process, e.g. data=4,model=2 (default: data=all devices)")
        p.add_argument("--distributed", action="store_true",
                       help="join JAX's multi-process runtime, cluster detected by JAX (TPU pod slice, SLURM)")
        p.add_argument("--coordinator", help="HOST:PORT of process 0, for an explicit multi-process launch")
        p.add_argument("--num-processes", type=int, help="with --coordinator: how many processes the run has")
        p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1 "
                       "(process 0 writes the merged tables)")
        p.set_defaults(func=_trace if name == "trace" else _sweep)
    from jaxflow.inputs.cli import add_parser as add_regions

    add_regions(sub)
    p = sub.add_parser("plot", help="figures and summary from result directories")
    p.add_argument("results", help="directory holding results.csv / lens.csv (searched recursively)")
    p.add_argument("--out", required=True, help="directory for the figures and summary.md (created if "
                   "needed)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("export", help="sweep results as the study's CSV files (its plotting scripts read them), "
                       "tracing results as one CSV of means and confidence intervals")
    p.add_argument("runs", nargs="+", help="sweep / trace result directories (searched recursively for run.json)")
    p.add_argument("--study", metavar="OUT",
                   help="writes OUT/output/information_flow/{model}/{task}/val/{flow}/..._window{k}_{flow}.csv")
    p.add_argument("--tracing", metavar="FILE", help="writes the tracing results' mean indirect effect per run, "
                   "site, region and layer with its 95%% CI into the CSV file FILE")
    p.add_argument("--model-name", help="the study's model name, e.g. llava_v1_5_7b (default: the name of the "
                   "checkpoint the model was converted from, '-' and '.' as '_')")
    p.set_defaults(func=_export)
    p = sub.add_parser("report", help="one self-contained HTML file (figures embedded, no network requests) from "
                       "sweep, lens and trace result directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIRS",
                   help="sweep / lens / trace result directories (searched recursively for run.json)")
    p.add_argument("--out", required=True, help="the HTML file to write (its folder is created if needed)")
    p.add_argument("--title", help="the report's title (default: 'jaxflow report: ' and the models' names)")
    p.add_argument("--gallery", type=int, default=1, metavar="N",
                   help="per sweep, the first N recorded samples drawn on their images (regions, attention per layer, "
                   "patch sweep, own flows), run on the model run.json names; 0: none (default: 1)")
    p.set_defaults(func=_report)
    p = sub.add_parser("demo", help="the whole analysis on the shipped toy LLaVA: convert, toy-world data, six flows, "
                       "logit lens, plots, report")
    p.add_argument("--out", default="jaxflow-demo",
                   help="output directory (default: ./jaxflow-demo; resumed if it exists)")
    p.add_argument("--samples-per-task", type=positive_int, default=demo_defaults()[0],
                   help="toy questions per task")
    p.add_argument("--seed", type=int, default=demo_defaults()[1], help="seed of the demo data")
    p.set_defaults(func=_demo)
    # --debug before or after the command name (SUPPRESS: a subcommand's default does not undo the top level's)
    for p in [parser, *sub.choices.values()]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the Python traceback instead of one line")
    parser.set_defaults(debug=False)
    return parser


def one_line(error: BaseException) -> str:
    """An error message on one line: continuation lines joined with '; ' (after a ':' with a space)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def quiet_closed_event_loop() -> None:
    """orbax reads through asyncio: after a read fails, the storage library's remaining callbacks find orbax's
    event loop closed and each reports `RuntimeError: Event loop is closed`, at any time up to the process exit.
    That is only the tail of the error already reported; this drops it and passes every other report on."""
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_storage_task_report)


def _storage_task_report(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task (or Future) exception was never retrieved" about an orbax / tensorstore read (the
    same tail of an already reported error, logged when the task is collected); True for every other record."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]:
        return True
    files = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
    storage = any("orbax" in f or "tensorstore" in f for f in files) or "[tensorstore_spec=" in str(exc)
    closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    return not (storage or closed)


def _torch_notice(record: logging.LogRecord) -> bool:
    """False for transformers' "PyTorch was not found. Models won't be available ..." (logged when transformers is
    imported without torch: jaxflow runs without it, and --allow-pickle says itself when it needs it)."""
    return not str(record.msg).startswith("PyTorch was not found")


def quiet_torch_notice() -> None:
    """Drops transformers' PyTorch notice from the command's output (a filter on its logger; the environment and
    transformers' other messages are left as they are). A library user importing transformers still sees it."""
    logging.getLogger("transformers").addFilter(_torch_notice)


def one_line_warnings(command: str) -> None:
    """jaxflow's own warnings (a window as wide as the model) print as one line, `jaxflow <command>: warning: ...`,
    like its errors; every other warning prints as before. Python's warning filters still decide whether one shows
    (by default once per call site)."""
    from jaxflow.sweep.flows import WindowWarning

    previous = getattr(warnings.showwarning, "passes_on", warnings.showwarning)  # not nested by a second main()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, WindowWarning):
            print(f"jaxflow {command}: warning: {one_line(message)}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    show.passes_on = previous
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    quiet_torch_notice()  # before the parser: building it imports jaxflow, which may import transformers
    args = build_parser().parse_args(argv)
    one_line_warnings(args.command)
    if not args.debug:
        quiet_closed_event_loop()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"jaxflow {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
