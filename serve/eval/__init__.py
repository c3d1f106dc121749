"""``stc-serve eval``: streaming accuracy on OVO-Bench / StreamingBench question files, through the same
pipeline the service runs, with compression and with compression off in one run (plain classes, no Ray)."""
from serve.eval.bench import BenchFormatError, EvalItem, load_bench, parse_choice, resolve_video, score
from serve.eval.harness import EvalRunner, ItemResult, compression_off, plot_report, results_json, summarize

__all__ = ["BenchFormatError", "EvalItem", "EvalRunner", "ItemResult", "compression_off", "load_bench",
           "parse_choice", "plot_report", "resolve_video", "results_json", "score", "summarize"]
